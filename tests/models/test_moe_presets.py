"""MoE presets and the decoder: parameter counts against published figures and against the modules
actually built, the aux convention of the decoder, bias updates through a whole model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import PRESETS, get_preset
from models.decoder import Decoder, count_params
from models.moe import RouterBias, apply_bias_updates

# (total, active) in billions as published: Mixtral paper / model card; DeepSeekMoE paper table 1;
# Qwen3-30B-A3B model card; OLMoE paper.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),
    "deepseek-moe-16b": (16.4, 2.8),
    "qwen3-30b-a3b": (30.5, 3.3),
    "olmoe-1b-7b": (6.9, 1.3),
    "qwen3-coder-30b-a3b": (30.5, 3.3),  # Qwen3-Coder-30B-A3B-Instruct model card
}
TINY = ["mixtral-tiny", "deepseek-moe-tiny", "qwen3-moe-tiny", "olmoe-tiny", "deepseek-v2-lite-tiny", "deepseek-v3-tiny"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    total, active = PUBLISHED[name]
    cfg = PRESETS[name]
    assert abs(cfg.param_count() / 1e9 - total) / total < 0.005
    # Active counts are published to one decimal, rounded or truncated (Qwen3's 3.35B is "3.3B"): within
    # 0.5% where that is finer than the last digit (Mixtral's 12.9B), else within one unit of it.
    active_count = cfg.param_count(active=True) / 1e9
    assert abs(active_count - active) < max(0.005 * active, 0.1), (name, active_count)


def test_qwen3_moe_non_embedding_count_matches_model_card():
    # Qwen3-30B-A3B model card: 29.9B non-embedding parameters.
    assert abs(PRESETS["qwen3-30b-a3b"].param_count(embeddings=False) / 1e9 - 29.9) / 29.9 < 0.005


def abstract_counts(cfg) -> tuple[int, int]:
    """(total, active) parameters of the decoder as built (abstractly, no memory): a token uses K of
    the E stacked experts' weights and every other parameter."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    total = active = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = variable.get_value().size
        total += size
        routed = "experts" in path and "shared_experts" not in path
        active += size * cfg.moe.experts_per_token // cfg.moe.num_experts if routed else size
    return total, active


@pytest.mark.parametrize("name", sorted(PUBLISHED) + TINY)
def test_param_count_formula_equals_the_built_model(name):
    cfg = PRESETS[name]
    assert abstract_counts(cfg) == (cfg.param_count(), cfg.param_count(active=True))


RATE = 0.05
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(2, 8)))


@pytest.fixture(scope="module")
def scanned_and_unrolled():
    """deepseek-moe-tiny with 3 layers (1 dense, 2 MoE) and bias updates on, scanned and unrolled,
    with the same parameters."""
    cfg = get_preset("deepseek-moe-tiny", vocab_size=96, n_layers=3)
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, bias_update_rate=RATE))
    scanned = Decoder(cfg, rngs=nnx.Rngs(0))
    unrolled = Decoder(cfg.replace(scan_layers=False), rngs=nnx.Rngs(1))
    for name, stack in scanned.stacks.items():
        stacked = nnx.state(stack.blocks, nnx.Param)
        for i, block in enumerate(unrolled.stacks[name].blocks):
            nnx.update(block, jax.tree.map(lambda x, i=i: x[i], stacked))
    nnx.update(unrolled.final_norm, nnx.state(scanned.final_norm))
    unrolled.embed.set_value(scanned.embed.get_value())
    return scanned, unrolled


def test_decoder_aux_convention_and_parameter_count(scanned_and_unrolled):
    model, _ = scanned_and_unrolled
    cfg = model.cfg
    assert count_params(model) == cfg.param_count()
    out = model(TOKENS)
    n_moe = cfg.n_layers - cfg.moe.first_dense_layers
    keys = ("loss_load_balancing", "loss_router_z", "expert_load", "load_max_mean_ratio", "dropped_fraction")
    assert set(out.aux) == {f"moe/{k}" for k in keys}
    assert out.aux["moe/expert_load"].shape == (n_moe, cfg.moe.num_experts)
    for key in keys:
        assert out.aux[f"moe/{key}"].shape[0] == n_moe
    np.testing.assert_allclose(out.aux["moe/expert_load"].sum(-1), 1.0, rtol=1e-6)


def test_scanned_and_unrolled_moe_stacks_agree_and_update_their_biases(scanned_and_unrolled):
    @nnx.jit
    def forward_and_update(model, tokens):
        out = model(tokens)
        apply_bias_updates(model, out.aux)
        return out

    scanned, unrolled = scanned_and_unrolled
    out_scanned, out_unrolled = forward_and_update(scanned, TOKENS), forward_and_update(unrolled, TOKENS)
    np.testing.assert_allclose(out_scanned.logits, out_unrolled.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_scanned.aux["moe/expert_load"], out_unrolled.aux["moe/expert_load"])
    load = np.asarray(out_scanned.aux["moe/expert_load"])
    expected = RATE * np.sign(load.mean(-1, keepdims=True) - load)  # one row per MoE layer
    np.testing.assert_allclose(scanned.stacks["moe"].blocks.ffn.router.bias[...], expected)
    for i, block in enumerate(unrolled.stacks["moe"].blocks):
        np.testing.assert_allclose(block.ffn.router.bias[...], expected[i])
    assert len(jax.tree.leaves(nnx.state(unrolled, RouterBias))) == 2
