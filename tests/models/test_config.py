"""Model config: published parameter counts, the FLOP formula against XLA's own count, validation."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from models.config import _LLAMA_GRID, PRESETS, ConfigError, ModelConfig, config_from_dict, get_preset
from models.decoder import Decoder, count_params

# Totals as published on the models' Hugging Face model cards / repository pages.
PUBLISHED_PARAMS = {
    "qwen2.5-coder-1.5b": 1.54e9,
    "qwen2.5-coder-7b": 7.61e9,
    "deepseek-coder-1.3b": 1.35e9,
    "deepseek-coder-6.7b": 6.74e9,
    "codellama-7b": 6.74e9,
    "starcoder2-3b": 3.03e9,
    "qwen3-8b": 8.19e9,
    "mistral-7b": 7.24e9,
    "llama-3-8b": 8.03e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_matches_published(name):
    count = PRESETS[name].param_count()
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.005, (name, count)


def test_qwen25_coder_counts_round_to_model_card():
    # Model cards: 0.49B total / 0.36B non-embedding; 1.54B / 1.31B (two decimals, so compare rounded).
    for name, total, non_embedding in [("qwen2.5-coder-0.5b", 0.49, 0.36), ("qwen2.5-coder-1.5b", 1.54, 1.31)]:
        cfg = PRESETS[name]
        assert round(cfg.param_count() / 1e9, 2) == total
        assert round(cfg.param_count(embeddings=False) / 1e9, 2) == non_embedding


@pytest.mark.parametrize("overrides", [
    {},
    {"qkv_bias": True, "out_bias": True, "norm": "layer", "mlp": "gelu", "mlp_bias": True},
    {"qk_norm": True, "tie_embeddings": False, "head_dim": 32},
])
def test_param_count_equals_built_model(overrides):
    cfg = get_preset("tiny", vocab_size=256, n_layers=2, **overrides)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == cfg.param_count()


def test_grid_spans_10m_to_3b():
    sizes = {n: PRESETS[n].param_count(embeddings=False) for n in _LLAMA_GRID}
    assert min(sizes.values()) == pytest.approx(10e6, rel=0.1)
    assert max(sizes.values()) == pytest.approx(3e9, rel=0.1)


def test_flops_per_token_matches_xla_cost_analysis():
    """6N + attention, against the FLOPs XLA counts for a compiled forward+backward step.

    Unrolled layers: XLA's cost analysis counts a scanned (while-loop) body once, not per layer."""
    cfg = get_preset("tiny", remat="none", n_layers=2, scan_layers=False)
    batch, seq = 2, 128
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    analysis = compiled.cost_analysis()
    xla_flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    ours = cfg.flops_per_token(seq) * batch * seq
    assert ours == pytest.approx(xla_flops, rel=0.02), (ours, xla_flops)


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ConfigError, match="norm: got 'batch'"):
        ModelConfig(norm="batch")
    with pytest.raises(ConfigError, match="rope_scaling.kind"):
        ModelConfig(rope_scaling={"kind": "ntk"})
    with pytest.raises(ConfigError, match="no field 'model.d_modle'; did you mean 'model.d_model'?"):
        config_from_dict({"preset": "tiny", "d_modle": 3})
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'gpt5'"):
        config_from_dict({"preset": "gpt5"})
    assert config_from_dict({"preset": "tiny", "n_layers": 3}).n_layers == 3


def test_every_model_field_is_overridable_from_the_config_file_section():
    from configs.base import model_section

    section = model_section("tiny")
    assert config_from_dict(section) == PRESETS["tiny"]  # unset placeholders keep the preset
    section.d_model, section.rope_scaling.kind, section.rope_scaling.factor = 128, "linear", 2.0
    cfg = config_from_dict(section)
    assert cfg.d_model == 128 and cfg.rope_scaling.kind == "linear" and cfg.n_layers == PRESETS["tiny"].n_layers
    section.moe.num_experts, section.moe.experts_per_token = 4, 1  # a dense preset becomes MoE
    assert config_from_dict(section).moe.num_experts == 4
    with pytest.raises(ConfigError, match="no field 'model.moe.num_expert'; did you mean 'model.moe.num_experts'?"):
        config_from_dict({"preset": "tiny", "moe": {"num_expert": 4}})
    with pytest.raises(ConfigError, match="model.moe.experts_per_token"):
        config_from_dict({"preset": "tiny", "moe": {"num_experts": 2, "experts_per_token": 3}})
