"""Gemma (CodeGemma), Gemma 2 and Gemma 3 against transformers: tiny random models (decoupled head_dim,
GeGLU, scaled embeddings, (1 + w) RMSNorm; Gemma 2's post-norms, query_pre_attn_scalar, soft-capped scores
and logits, alternating sliding and global layers; Gemma 3's QK-norm, 5:1 layer pattern and RoPE base per
layer type) import with logits equal to 1e-4 in float32, scanned and unrolled, and export back to the
same logits; config defaults equal transformers' config classes; the
CodeGemma-7B preset has its published size; greedy decoding through both KV caches equals decoding
without one, soft-caps included."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import PRESETS, ConfigError, get_preset
from models.decoder import Decoder
from models.hf.registry import get_family, infer_family
from models.sampler import Sampler
from tests.models.test_layer_schedule import assert_layer_cache_decoding_is_the_full_forward
from tests.models.test_moe_presets import abstract_counts
from tests.models.test_sampler import PROMPTS, greedy_without_cache
from tests.models.test_sampler import tiny as sampler_tiny

# ---- presets ------------------------------------------------------------------------------------------


def test_codegemma_7b_has_its_published_size():
    # google/codegemma-7b model card: 8.54B parameters; the Gemma report (Gemma Team 2024, table 2) counts
    # Gemma 7B's non-embedding parameters exactly (its embedding count is of a 256,128-row table).
    cfg = PRESETS["codegemma-7b"]
    assert abs(cfg.param_count() / 1e9 - 8.54) / 8.54 < 0.005
    assert cfg.param_count(embeddings=False) == 7_751_248_896
    assert infer_family(cfg).model_type == "gemma"


@pytest.mark.parametrize("name", ["codegemma-7b", "gemma2-tiny"])
def test_param_count_formula_equals_the_built_model(name):
    cfg = PRESETS[name]
    assert abstract_counts(cfg)[0] == cfg.param_count()


def test_other_families_refuse_gemma_fields():
    cfg = PRESETS["tiny"]
    assert infer_family(cfg).model_type == "llama"
    for field, value in [("mlp", "geglu"), ("scale_embeddings", True), ("norm_scale_offset", 1.0), ("post_norms", True)]:
        with pytest.raises(ConfigError, match=field):
            get_family("llama").hf_config(cfg.replace(**{field: value}))
    assert infer_family(PRESETS["gemma2-tiny"]).model_type == "gemma2"
    with pytest.raises(ConfigError, match="logit_softcap"):
        get_family("gemma").hf_config(PRESETS["gemma2-tiny"].replace(post_norms=False, global_every=0))


def test_gemma_fields_are_validated():
    with pytest.raises(ConfigError, match="norm_scale_offset"):
        get_preset("tiny", norm="layer", norm_scale_offset=1.0)
    with pytest.raises(ConfigError, match="attn_logit_softcap"):
        get_preset("tiny", attn_logit_softcap=-1.0)
    with pytest.raises(ConfigError, match="mla"):
        get_preset("deepseek-v3-tiny", attn_logit_softcap=50.0)


# ---- against transformers --------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.hf import load_hf_checkpoint, read_hf_config, reference, save_hf_checkpoint  # noqa: E402
from tests.models.hf_helpers import assert_minimal_config_reads_like_transformers, logits_diff  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, reference.TINY_SHAPE["vocab_size"], size=(2, 12))
# head_dim decoupled from hidden_size / heads; Gemma 2: 4 layers (the sliding/global pair twice), a
# window and caps small enough to change the logits of 12 tokens, a query scale other than head_dim.
OPTIONS = {
    "gemma": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "num_hidden_layers": 4, "sliding_window": 3, "query_pre_attn_scalar": 24,
               "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    # transformers' default 5 sliding layers to 1 global; local and global RoPE bases apart, the global
    # layer's scaled as Gemma 3 4B-27B's are.
    "gemma3_text": {"head_dim": 32, "num_hidden_layers": 6, "sliding_window": 3, "query_pre_attn_scalar": 24,
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}},
}
STACKS = {"gemma": ["dense"], "gemma2": ["dense_sliding-dense_full"], "gemma3_text": ["dense_sliding", "dense_full"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> (checkpoint dir, transformers logits), built once."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            model = reference.random_model(model_type, **OPTIONS[model_type])
            directory = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(directory)
            cache[model_type] = directory, reference.logits(model, TOKENS)
        return cache[model_type]

    return get


def max_diff(model, expected):
    return logits_diff(model(TOKENS).logits, expected)


@pytest.mark.parametrize("model_type, scan_layers", [
    ("gemma2", True),
    pytest.param("gemma2", False, marks=pytest.mark.slow),
    pytest.param("gemma", True, marks=pytest.mark.slow),
    pytest.param("gemma", False, marks=pytest.mark.slow),
    pytest.param("gemma3_text", True, marks=pytest.mark.slow),
    pytest.param("gemma3_text", False, marks=pytest.mark.slow),
], ids=lambda v: {True: "scanned", False: "unrolled"}.get(v, v) if isinstance(v, bool) else v)
def test_import_matches_transformers_logits(saved, model_type, scan_layers):
    directory, expected = saved(model_type)
    model = load_hf_checkpoint(directory, scan_layers=scan_layers)
    assert [name for name, _ in model.ordered_stacks()] == STACKS[model_type]
    assert max_diff(model, expected) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model_type, options_off", [
    ("gemma2", [dict(attn_logit_softcap=0.0), dict(logit_softcap=0.0), dict(query_pre_attn_scalar=0),
                dict(layer_types=()), dict(scale_embeddings=False), dict(norm_scale_offset=0.0)]),
    ("gemma3_text", [dict(sliding_rope_theta=0.0), dict(rope_scaling={"kind": "none"})]),
])
def test_each_gemma_option_changes_the_logits(saved, model_type, options_off):
    """The parity above would hold for an option codelm ignored only if it changed nothing: each, turned
    off on import, moves the logits far more than the tolerance."""
    directory, expected = saved(model_type)
    for off in options_off:
        assert max_diff(load_hf_checkpoint(directory, **off), expected) > 1e-2, off


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_export_round_trip_through_transformers(saved, model_type, tmp_path):
    directory, expected = saved(model_type)
    model = load_hf_checkpoint(directory)
    save_hf_checkpoint(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == get_family(model_type).architecture
    np.testing.assert_array_less(np.abs(reference.logits(reloaded, TOKENS) - expected).max(), 1e-4)
    # The checkpoint's norm weights (stored as scale - 1) come back bit for bit.
    original = transformers.AutoModelForCausalLM.from_pretrained(directory)
    np.testing.assert_array_equal(reloaded.model.norm.weight.detach().numpy(), original.model.norm.weight.detach().numpy())


def test_gemma2_config_reads_every_gemma_field(saved):
    cfg, family = read_hf_config(saved("gemma2")[0])
    assert family.model_type == "gemma2" and (cfg.mlp, cfg.head_dim, cfg.tie_embeddings) == ("geglu", 32, True)
    assert (cfg.query_pre_attn_scalar, cfg.attn_logit_softcap, cfg.logit_softcap) == (24, 5.0, 3.0)
    assert cfg.scale_embeddings and cfg.post_norms and cfg.norm_scale_offset == 1.0
    assert [cfg.layer_window(i) for i in range(4)] == [3, 0, 3, 0]


@pytest.mark.slow
def test_gemma3_config_reads_rope_per_layer_type(saved):
    cfg, family = read_hf_config(saved("gemma3_text")[0])
    assert family.model_type == "gemma3_text" and cfg.qk_norm and cfg.post_norms
    assert (cfg.rope_theta, cfg.rope_scaling.kind, cfg.rope_scaling.factor, cfg.sliding_rope_theta) == (1e6, "linear", 8.0, 10.0)
    assert [cfg.layer_window(i) for i in range(6)] == [3] * 5 + [0]
    assert (cfg.attn_logit_softcap, cfg.logit_softcap) == (0.0, 0.0)


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_missing_config_fields_take_transformers_defaults(model_type, tmp_path):
    assert_minimal_config_reads_like_transformers(model_type, tmp_path, vocab_size=96, hidden_size=256,
                                                  num_hidden_layers=4, num_attention_heads=16, intermediate_size=96)


@pytest.mark.parametrize("name, model_type", [("codegemma-7b", "gemma"), ("gemma2-tiny", "gemma2")])
def test_presets_survive_config_round_trip(name, model_type, tmp_path):
    cfg = PRESETS[name]
    config = get_family(model_type).hf_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(config))
    transformers.AutoConfig.for_model(**config)  # transformers' strict config classes accept it
    back, _ = read_hf_config(tmp_path, name=cfg.name, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             scan_layers=cfg.scan_layers, remat=cfg.remat, init_std=cfg.init_std)
    # config.json spells the schedule per layer (`layer_types`), the preset as `global_every`.
    assert back.replace(layer_types=(), global_every=cfg.global_every) == cfg
    assert [back.layer_window(i) for i in range(cfg.n_layers)] == [cfg.layer_window(i) for i in range(cfg.n_layers)]


# ---- decoding with the KV caches ----------------------------------------------------------------------

# The sampler tests' tiny model as Gemma 2, with caps that change its scores and logits.
DECODER = sampler_tiny(mlp="geglu", scale_embeddings=True, norm_scale_offset=1.0, post_norms=True, n_layers=4,
                       head_dim=32, sliding_window=4, global_every=2, query_pre_attn_scalar=24,
                       attn_logit_softcap=2.0, logit_softcap=5.0, tie_embeddings=True)


@pytest.mark.slow
def test_greedy_decoding_with_both_caches_equals_decoding_without():
    model = Decoder(DECODER, rngs=nnx.Rngs(0))
    uncapped = Decoder(DECODER.replace(attn_logit_softcap=0.0), rngs=nnx.Rngs(0))  # the same weights
    tokens = jnp.asarray(TOKENS[:, :10] % DECODER.vocab_size)
    assert np.abs(np.asarray(model(tokens).logits - uncapped(tokens).logits)).max() > 1e-2, "the cap must bite"
    assert_layer_cache_decoding_is_the_full_forward(model, tokens)
    out = Sampler(model).generate(PROMPTS, max_new_tokens=8)
    for prompt, generated in zip(PROMPTS, out.tokens):
        assert generated == greedy_without_cache(model, prompt, 8)
