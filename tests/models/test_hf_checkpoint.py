"""Hugging Face import/export against `transformers` itself: for every family a tiny random model is
saved by transformers, imported into codelm (logits equal to 1e-4 in float32), exported back and
reloaded by transformers (logits equal again). Plus sharded checkpoints onto a mesh, config defaults
against transformers' config classes, and the errors bad checkpoints raise."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs.sharding_rules import DEFAULT_RULES  # noqa: E402
from models.config import PRESETS, ConfigError  # noqa: E402
from models.hf import (  # noqa: E402
    FAMILIES,
    infer_family,
    load_hf_checkpoint,
    read_hf_config,
    reference,  # noqa: E402
    save_hf_checkpoint,
)
from models.hf.safetensors_io import INDEX_FILE, CheckpointFormatError, SafetensorsReader, write_sharded  # noqa: E402
from models.sharding import make_mesh, state_shardings  # noqa: E402
from tests.models.hf_helpers import assert_logits_close, assert_minimal_config_reads_like_transformers  # noqa: E402

DENSE = ["llama", "qwen2", "qwen3", "mistral", "starcoder2"]
MOE = ["mixtral", "qwen3_moe"]
ALL = DENSE + MOE
TOLERANCE = 1e-4


def tokens(batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, reference.TINY_SHAPE["vocab_size"], size=(batch, length))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> (checkpoint dir, transformers logits of `tokens()`), built once per family."""
    cache = {}

    def get(model_type, **options):
        key = (model_type, json.dumps(options, sort_keys=True))
        if key not in cache:
            model = reference.random_model(model_type, **options)
            directory = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(directory)
            cache[key] = (directory, reference.logits(model, tokens()))
        return cache[key]

    return get


def codelm_logits(model, toks=None):
    return np.asarray(model(np.asarray(tokens() if toks is None else toks)).logits)


# Layer stacking is family-independent; unrolled stacks are checked on two families to save time.
@pytest.mark.parametrize(
    "model_type, scan_layers",
    [(t, True) for t in ALL] + [("llama", False), ("qwen3_moe", False)],
    ids=lambda v: {True: "scanned", False: "unrolled"}.get(v, v) if isinstance(v, bool) else v,
)
def test_import_matches_transformers_logits(saved, model_type, scan_layers):
    directory, expected = saved(model_type)
    model = load_hf_checkpoint(directory, scan_layers=scan_layers)
    assert model.cfg.dtype == model.cfg.param_dtype == "float32"
    assert_logits_close(codelm_logits(model), expected)


@pytest.mark.parametrize("model_type", ALL)
def test_export_round_trip_through_transformers(saved, model_type, tmp_path):
    directory, expected = saved(model_type)
    model = load_hf_checkpoint(directory, scan_layers=model_type != "qwen2")
    save_hf_checkpoint(model, tmp_path, family=model_type)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == FAMILIES[model_type].architecture
    assert_logits_close(reference.logits(reloaded, tokens()), expected)
    # ... and codelm reads its own export back to the same function.
    assert_logits_close(codelm_logits(load_hf_checkpoint(tmp_path)), expected)


def test_moe_with_leading_dense_layers(saved, tmp_path):
    """Qwen3-MoE's mlp_only_layers=[0]: a dense stack, then an MoE stack."""
    directory, expected = saved("qwen3_moe", mlp_only_layers=[0])
    model = load_hf_checkpoint(directory)
    assert model.cfg.moe.first_dense_layers == 1 and set(model.stacks) == {"dense", "moe"}
    assert_logits_close(codelm_logits(model), expected)
    save_hf_checkpoint(model, tmp_path)
    assert_logits_close(reference.logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), tokens()), expected)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},  # DeepSeek-Coder, CodeLlama
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_variants_import_and_export(saved, rope, tmp_path):
    directory, expected = saved("llama", rope_parameters={"rope_theta": 10000.0, **rope}, attention_bias=True, mlp_bias=True)
    model = load_hf_checkpoint(directory)
    assert model.cfg.rope_scaling.kind == rope["rope_type"] and model.cfg.qkv_bias and model.cfg.mlp_bias
    assert_logits_close(codelm_logits(model), expected)
    save_hf_checkpoint(model, tmp_path)
    assert_logits_close(reference.logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), tokens()), expected)


def test_sharded_checkpoint_loads_onto_mesh_with_target_shardings(saved, tmp_path):
    directory, expected = saved("qwen2")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / INDEX_FILE).is_file()

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    model = load_hf_checkpoint(tmp_path / "hf", mesh=mesh, rules=DEFAULT_RULES)
    targets = state_shardings(nnx.state(model, nnx.Param), mesh, DEFAULT_RULES)
    placed = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, target in nnx.to_flat_state(targets):
        assert placed[path].get_value().sharding == target.get_value(), path
    assert any(not v.get_value().sharding.is_fully_replicated for v in placed.values())
    assert_logits_close(codelm_logits(model), expected)

    # Export in several shards with an index, which transformers reads.
    save_hf_checkpoint(model, tmp_path / "out", max_shard_bytes=64 << 10)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_logits_close(reference.logits(reloaded, tokens()), expected)


def test_bfloat16_checkpoint_keeps_its_dtype(saved, tmp_path):
    directory, _ = saved("llama")
    transformers.AutoModelForCausalLM.from_pretrained(directory, dtype="bfloat16").save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path)
    assert model.cfg.param_dtype == "bfloat16" and model.embed.get_value().dtype == jax.numpy.bfloat16
    reference_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    embed = reference_bf16.get_input_embeddings().weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed.get_value(), np.float32), embed)


# ---- config translation -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ALL)
def test_missing_config_fields_take_transformers_defaults(model_type, tmp_path):
    """A config.json with only the shape fields reads like transformers' fully expanded one."""
    # 32 heads: the default number of KV heads of some families must divide it.
    assert_minimal_config_reads_like_transformers(model_type, tmp_path, vocab_size=96, hidden_size=512,
                                                  num_hidden_layers=2, num_attention_heads=32, intermediate_size=96)


@pytest.mark.parametrize("name", ["deepseek-coder-6.7b", "codellama-7b", "qwen2.5-coder-7b", "qwen2.5-coder-0.5b",
                                  "qwen3-8b", "starcoder2-3b", "mistral-7b", "llama-3-8b", "mixtral-8x7b",
                                  "qwen3-30b-a3b"])
def test_presets_survive_config_round_trip(name, tmp_path):
    cfg = PRESETS[name]
    family = infer_family(cfg)
    (tmp_path / "config.json").write_text(json.dumps(family.hf_config(cfg)))
    back, _ = read_hf_config(tmp_path, name=cfg.name, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    assert back == cfg
    # transformers parses the same shapes out of it.
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (cfg.d_model, cfg.n_kv_heads, cfg.head_dim)


def test_inferred_families():
    assert infer_family(PRESETS["codellama-7b"]).model_type == "llama"
    assert infer_family(PRESETS["qwen2.5-coder-7b"]).model_type == "qwen2"
    assert infer_family(PRESETS["qwen3-8b"]).model_type == "qwen3"
    assert infer_family(PRESETS["mistral-7b"]).model_type == "mistral"
    assert infer_family(PRESETS["starcoder2-3b"]).model_type == "starcoder2"
    assert infer_family(PRESETS["mixtral-8x7b"]).model_type == "mixtral"
    assert infer_family(PRESETS["qwen3-30b-a3b"]).model_type == "qwen3_moe"
    with pytest.raises(ConfigError, match="num_shared_experts"):
        infer_family(PRESETS["deepseek-moe-16b"])
    with pytest.raises(ConfigError, match="logit_softcap"):
        infer_family(PRESETS["tiny"].replace(logit_softcap=30.0))


# ---- bad input ------------------------------------------------------------------------------------------


def copy_checkpoint(saved, tmp_path, model_type="llama"):
    directory, _ = saved(model_type)
    shutil.copytree(directory, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unsupported_field_names_file_and_field(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    edit_config(directory, hidden_act="relu")
    with pytest.raises(ConfigError, match=r"config\.json: field 'hidden_act' = 'relu'"):
        load_hf_checkpoint(directory)
    edit_config(directory, hidden_act="silu", model_type="gpt2")
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        load_hf_checkpoint(directory)
    edit_config(directory, model_type="llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="rope_parameters.rope_type = 'dynamic'"):
        load_hf_checkpoint(directory)


def test_shape_mismatch_names_tensor(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    edit_config(directory, intermediate_size=128)
    with pytest.raises(CheckpointFormatError, match=r"'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
        load_hf_checkpoint(directory)


def test_config_and_weights_disagreeing_is_an_error(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    edit_config(directory, attention_bias=True)  # the weights have no biases
    with pytest.raises(CheckpointFormatError, match=r"'model\.layers\.0\.self_attn\.[qkvo]_proj\.bias' not found"):
        load_hf_checkpoint(directory)
    edit_config(directory, attention_bias=False, num_hidden_layers=1)  # layer 1 would be left over
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.1\..* map to no parameter"):
        load_hf_checkpoint(directory)


def test_import_holds_one_parameter_at_a_time_on_the_host(tmp_path):
    """Host (numpy) allocations while importing stay far below the checkpoint's size: tensors are
    memory-mapped and each parameter is freed once placed (unrolled layers: one layer's tensor each)."""
    import tracemalloc

    model = reference.random_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=1024)
    model.save_pretrained(tmp_path)
    checkpoint_bytes = (tmp_path / "model.safetensors").stat().st_size  # ~34 MB
    tracemalloc.start()
    loaded = load_hf_checkpoint(tmp_path, scan_layers=False)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # On CPU a device array may keep the host buffer it was made from, so `held` is (part of) the model
    # itself; what reading added on top of it at any moment is peak - held.
    assert peak - held < checkpoint_bytes / 8, (peak, held, checkpoint_bytes)
    del loaded


def test_rope_buffers_of_older_checkpoints_are_ignored_and_bin_files_named(saved, tmp_path):
    directory, expected = saved("llama")
    with SafetensorsReader(directory) as reader:
        tensors = [(name, np.array(reader[name])) for name in reader.keys()]
    inv_freq = ("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(8, np.float32))
    write_sharded([*tensors, inv_freq], tmp_path / "old")
    shutil.copy(directory / "config.json", tmp_path / "old")
    assert_logits_close(codelm_logits(load_hf_checkpoint(tmp_path / "old")), expected)

    (tmp_path / "bin").mkdir()
    shutil.copy(directory / "config.json", tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are PyTorch pickles"):
        load_hf_checkpoint(tmp_path / "bin")
