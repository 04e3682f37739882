"""DeepSeek-V2 and DeepSeek-V3 against transformers: tiny random models (MLA with and without a query
bottleneck, group-limited routing, shared experts, a dense first layer, V3's selection bias) import
with logits equal to 1e-4 in float32, scanned and unrolled, and export back to the same logits; the
routers alone equal transformers' MoE blocks; config defaults equal transformers' config classes."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.config import PRESETS, ConfigError  # noqa: E402
from models.hf import get_family, load_hf_checkpoint, read_hf_config, reference, save_hf_checkpoint  # noqa: E402
from models.hf.layouts import HeadsIn, RopeRows, Transposed  # noqa: E402
from tests.models.hf_helpers import assert_logits_close, assert_minimal_config_reads_like_transformers  # noqa: E402
from tests.models.test_moe_hf import compare, our_layer, t  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, reference.TINY_SHAPE["vocab_size"], size=(2, 12))
SELECTION_BIAS = np.linspace(-0.3, 0.3, 8, dtype=np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> (checkpoint dir, transformers logits), built once. V3 gets a nonzero selection bias
    (`e_score_correction_bias`, zero at init) so that it changes which experts are chosen."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            model = reference.random_model(model_type)
            if model_type == "deepseek_v3":
                with torch.no_grad():
                    for layer in model.model.layers[model.config.first_k_dense_replace:]:
                        layer.mlp.gate.e_score_correction_bias.copy_(t(SELECTION_BIAS))
            directory = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(directory)
            cache[model_type] = directory, reference.logits(model, TOKENS)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type, scan_layers", [
    ("deepseek_v2", True), ("deepseek_v3", True),
    pytest.param("deepseek_v2", False, marks=pytest.mark.slow), pytest.param("deepseek_v3", False, marks=pytest.mark.slow),
], ids=lambda v: {True: "scanned", False: "unrolled"}.get(v, v) if isinstance(v, bool) else v)
def test_import_matches_transformers_logits(saved, model_type, scan_layers):
    directory, expected = saved(model_type)
    model = load_hf_checkpoint(directory, scan_layers=scan_layers)
    assert model.cfg.mla is not None and list(model.stacks) == ["dense", "moe"]
    assert_logits_close(np.asarray(model(TOKENS).logits), expected)


def test_v2_config_reads_mla_and_group_limited_softmax_routing(saved):
    cfg, _ = read_hf_config(saved("deepseek_v2")[0])
    assert (cfg.mla.q_lora_rank, cfg.mla.kv_lora_rank, cfg.mla.qk_head_dim, cfg.mla.v_head_dim) == (24, 16, 24, 12)
    m = cfg.moe
    assert (m.router, m.num_groups, m.topk_groups, m.normalize_top_k, m.routed_scaling) == ("softmax", 4, 2, False, 1.5)
    assert (m.num_shared_experts, m.first_dense_layers, m.expert_d_ff) == (2, 1, 32)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_export_round_trip_through_transformers(saved, model_type, tmp_path):
    directory, expected = saved(model_type)
    model = load_hf_checkpoint(directory)
    save_hf_checkpoint(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == get_family(model_type).architecture
    assert_logits_close(reference.logits(reloaded, TOKENS), expected)
    if model_type == "deepseek_v3":  # the selection bias travels with the weights
        np.testing.assert_array_equal(reloaded.model.layers[1].mlp.gate.e_score_correction_bias.numpy(), SELECTION_BIAS)
    assert_logits_close(np.asarray(load_hf_checkpoint(tmp_path)(TOKENS).logits), expected)


def test_rope_rows_reorder_interleaved_pairs_and_back():
    rows = np.arange(2 * 6 * 3).reshape(12, 3).astype(np.float32)  # 2 heads of 2 nope + 4 rope rows, 3 inputs
    layout = RopeRows(HeadsIn(2, 6), group=6, rope=4)
    codelm = layout.to_codelm(rows)
    assert codelm.shape == (3, 2, 6)
    np.testing.assert_array_equal(codelm[0, 0], rows[[0, 1, 2, 4, 3, 5], 0])  # pairs (2,3), (4,5) -> halves (2,4), (3,5)
    np.testing.assert_array_equal(layout.to_hf(codelm), rows)
    kv = RopeRows(Transposed(), group=5, rope=2)  # latent rows stay, the last two are one pair
    np.testing.assert_array_equal(kv.to_hf(kv.to_codelm(rows[:5])), rows[:5])


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_missing_config_fields_take_transformers_defaults(model_type, tmp_path):
    assert_minimal_config_reads_like_transformers(model_type, tmp_path, vocab_size=96, hidden_size=512,
                                                  num_hidden_layers=4, num_attention_heads=32, intermediate_size=96,
                                                  num_experts_per_tok=4)


def test_unsupported_v2_options_are_named(saved, tmp_path):
    directory, _ = saved("deepseek_v2")
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "topk_method": "noaux_tc"}))
    with pytest.raises(ConfigError, match="field 'topk_method' = 'noaux_tc'"):
        read_hf_config(tmp_path)


# ---- the MoE layer alone, with group-limited routing ------------------------------------------------


def test_matches_deepseek_v3_moe_with_group_limited_sigmoid_routing():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    config = transformers.DeepseekV3Config(hidden_size=16, moe_intermediate_size=12, n_routed_experts=8,
                                           num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    block = modeling_deepseek_v3.DeepseekV3MoE(config).eval()
    layer = our_layer(experts_per_token=3, num_shared_experts=1, router="sigmoid", routed_scaling=2.5,
                      num_groups=4, topk_groups=2)
    layer.router.bias.set_value(jnp.asarray(SELECTION_BIAS))
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(t(SELECTION_BIAS))
    compare(block, layer)


@pytest.mark.slow
def test_matches_deepseek_v2_moe_with_group_limited_greedy_routing():
    from transformers.models.deepseek_v2 import modeling_deepseek_v2

    config = transformers.DeepseekV2Config(hidden_size=16, moe_intermediate_size=12, n_routed_experts=8,
                                           num_experts_per_tok=3, n_shared_experts=2, n_group=4, topk_group=2,
                                           topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                                           num_attention_heads=4)
    block = modeling_deepseek_v2.DeepseekV2Moe(config).eval()
    layer = our_layer(experts_per_token=3, num_shared_experts=2, normalize_top_k=False, routed_scaling=1.5,
                      num_groups=4, topk_groups=2)
    compare(block, layer)


# ---- DeepSeek's YaRN ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepseek_yarn_with_mscale_matches_transformers_and_exports(tmp_path):
    """DeepSeek's context extension: YaRN frequencies, cos/sin factor mscale / mscale_all_dim, scores
    sharpened by mscale_all_dim^2 (as DeepSeek-Coder-V2-Lite's config.json, at factor 4)."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
            "mscale_all_dim": 0.707, "rope_theta": 10000.0}
    hf_model = reference.random_model("deepseek_v2", rope_parameters=rope)
    hf_model.save_pretrained(tmp_path / "hf")
    expected = reference.logits(hf_model, TOKENS)
    model = load_hf_checkpoint(tmp_path / "hf")
    assert model.cfg.rope_scaling.attention_factor == 1.0 and model.cfg.mla.score_scale == pytest.approx(1.2056, abs=1e-4)
    assert_logits_close(np.asarray(model(TOKENS).logits), expected)
    save_hf_checkpoint(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_logits_close(reference.logits(reloaded, TOKENS), expected)


@pytest.mark.parametrize("name, model_type", [("deepseek-coder-v2-lite", "deepseek_v2"), ("deepseek-v3", "deepseek_v3")])
def test_presets_survive_config_round_trip(name, model_type, tmp_path):
    cfg = PRESETS[name]
    (tmp_path / "config.json").write_text(json.dumps(get_family(model_type).hf_config(cfg)))
    back, _ = read_hf_config(tmp_path, name=cfg.name, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    assert back.mla.score_scale == pytest.approx(cfg.mla.score_scale, rel=1e-12)
    # The bias update rate is a training setting a checkpoint does not carry.
    assert back.replace(mla=cfg.mla, moe=dataclasses.replace(back.moe, bias_update_rate=cfg.moe.bias_update_rate)) == cfg
