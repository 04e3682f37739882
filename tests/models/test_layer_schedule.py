"""Per-layer schedules: sliding and full attention layers, MoE every k-th layer. How layers are cut into
scanned stacks of a repeating pattern, logits equal to transformers for Qwen2 (`max_window_layers`,
`layer_types`) and Qwen3-MoE (`use_sliding_window`, `decoder_sparse_step`), scanned and unrolled
stacks agreeing, bias updates through a pattern stack, KV-cache decoding equal to full forwards."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import ConfigError, MoEConfig, get_preset
from models.decoder import Decoder, LayerSpec, plan_stacks
from models.moe import apply_bias_updates
from models.sampler import Sampler
from tests.models.test_sampler import PROMPTS, greedy_without_cache

S, F = LayerSpec(4, False), LayerSpec(0, False)


def tiny(**overrides):
    fields = dict(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=4, dtype="float32",
                  init_std=0.2, max_seq_len=256, sliding_window=4)
    return get_preset("tiny", **{**fields, **overrides})


def test_layers_are_cut_into_repeating_patterns():
    def shape(cfg):
        return [(p.name, p.first_layer, p.pattern, p.repeats) for p in plan_stacks(cfg)]

    # Gemma 2: alternating sliding / full -> one stack of a two-layer pattern.
    assert shape(tiny(n_layers=6, global_every=2)) == [("dense_sliding-dense_full", 0, (S, F), 3)]
    # Gemma 3 (26 layers, every 6th full): four six-layer patterns, then the two sliding layers left.
    assert shape(tiny(n_layers=26, global_every=6)) == [
        ("dense_sliding-dense_sliding-dense_sliding-dense_sliding-dense_sliding-dense_full", 0, (S,) * 5 + (F,), 4),
        ("dense_sliding", 24, (S,), 2)]
    # Qwen2's max_window_layers: full layers, then sliding ones.
    types = ("full_attention",) * 3 + ("sliding_attention",) * 5
    assert shape(tiny(n_layers=8, layer_types=types)) == [("dense_full", 0, (F,), 3), ("dense_sliding", 3, (S,), 5)]
    # Uniform models keep their stack names; MoE every other layer after a dense one.
    moe = MoEConfig(num_experts=4, experts_per_token=2, expert_d_ff=32, first_dense_layers=1)
    assert [p.name for p in plan_stacks(tiny(moe=moe))] == ["dense", "moe"]
    sparse = tiny(n_layers=5, moe=dataclasses.replace(moe, sparse_step=2))
    assert shape(sparse) == [("dense-moe", 0, (LayerSpec(4, False), LayerSpec(4, True)), 2),
                             ("dense", 4, (LayerSpec(4, False),), 1)]
    assert sparse.n_moe_layers == 2 and sparse.n_dense_layers == 3


def test_schedule_fields_are_validated():
    with pytest.raises(ConfigError, match="layer_types: needs one entry per layer"):
        tiny(layer_types=("full_attention",))
    with pytest.raises(ConfigError, match="layer_types: got 'local'"):
        tiny(layer_types=("local",) * 4)
    with pytest.raises(ConfigError, match="sliding_window: sliding_attention layers need a window"):
        tiny(sliding_window=0, global_every=2)


def test_flops_count_each_layer_window():
    full, windowed = tiny(sliding_window=0), tiny(global_every=2)
    attention = 6.0 * full.n_heads * 2 * full.head_dim  # 6 * heads * (qk + v head dims) per key
    assert full.flops_per_token(64) - windowed.flops_per_token(64) == pytest.approx(attention * 2 * (64 - 4))


# ---- against transformers --------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.hf import load_hf_checkpoint, reference, save_hf_checkpoint  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, reference.TINY_SHAPE["vocab_size"], size=(2, 12))


def check_parity(tmp_path, model_type, expect_stacks, scan_layers=(True, False), round_trip=True, **options):
    hf_model = reference.random_model(model_type, **options)
    hf_model.save_pretrained(tmp_path / "hf")
    expected = reference.logits(hf_model, TOKENS)
    assert expected.std() > 0.5
    for scan in scan_layers:
        model = load_hf_checkpoint(tmp_path / "hf", scan_layers=scan)
        assert list(model.stacks) == expect_stacks
        np.testing.assert_array_less(np.abs(np.asarray(model(TOKENS).logits) - expected).max(), 1e-4)
    if round_trip:
        save_hf_checkpoint(model, tmp_path / "out")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        np.testing.assert_array_less(np.abs(reference.logits(reloaded, TOKENS) - expected).max(), 1e-4)
    return model


def test_qwen2_max_window_layers_mixed_layers_match_transformers(tmp_path):
    model = check_parity(tmp_path, "qwen2", ["dense_full", "dense_sliding"], scan_layers=(True,), num_hidden_layers=3,
                         use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert model.cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["max_window_layers"] == 1 and exported["layer_types"][0] == "full_attention"


@pytest.mark.slow
def test_qwen3_explicit_alternating_layer_types_match_transformers(tmp_path):
    check_parity(tmp_path, "qwen3", ["dense_sliding-dense_full"], round_trip=False,
                 num_hidden_layers=4, use_sliding_window=True, sliding_window=3,
                 layer_types=["sliding_attention", "full_attention"] * 2)


def test_qwen3_moe_sliding_window_applies_to_every_layer(tmp_path):
    """The bug: the window was read through Qwen2's max_window_layers rule, which Qwen3-MoE does not have."""
    model = check_parity(tmp_path, "qwen3_moe", ["moe"], scan_layers=(True,), use_sliding_window=True, sliding_window=3,
                         max_window_layers=28)
    assert model.cfg.sliding_window == 3 and model.cfg.layer_types == ()


@pytest.mark.slow
def test_qwen3_moe_decoder_sparse_step(tmp_path):
    model = check_parity(tmp_path, "qwen3_moe", ["dense-moe"], num_hidden_layers=4, decoder_sparse_step=2)
    assert model.cfg.moe.sparse_step == 2 and model.cfg.n_moe_layers == 2


# ---- decoding and bias updates through pattern stacks --------------------------------------------------

PATTERN = tiny(n_layers=5, global_every=2, qk_norm=True,
               moe=MoEConfig(num_experts=4, experts_per_token=2, expert_d_ff=32, first_dense_layers=1, sparse_step=2,
                             bias_update_rate=0.1))


@nnx.jit
def forward_and_update(model, tokens):
    out = model(tokens)
    apply_bias_updates(model, out.aux)
    return out


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scanned", "unrolled"])
def test_bias_updates_reach_each_moe_layer_of_a_pattern_stack(scan):
    model = Decoder(PATTERN.replace(scan_layers=scan), rngs=nnx.Rngs(0))
    out = forward_and_update(model, jnp.asarray(TOKENS))
    key = [k for k in out.aux if k.endswith("expert_load")]
    assert key == ["dense_sliding-moe_full/1/expert_load"]
    load = np.asarray(out.aux[key[0]])  # [2 repeats, E]
    gap = load.mean(-1, keepdims=True) - load
    stack = model.stacks["dense_sliding-moe_full"]
    biases = stack.blocks[1].ffn.router.bias[...] if scan else np.stack([b.ffn.router.bias[...] for b in stack.blocks[1]])
    decided = np.abs(gap) > 1e-6  # an expert at exactly the mean load may round to either side in float32
    np.testing.assert_allclose(np.asarray(biases)[decided], 0.1 * np.sign(gap[decided]))
    assert decided.sum() >= 6 and np.all(np.abs(np.asarray(biases)) <= 0.1 + 1e-7)


def assert_layer_cache_decoding_is_the_full_forward(model, tokens, prefill: int = 6):
    """Prefill `prefill` tokens into the LayerCache, then one token at a time: the logits equal one full forward."""
    b, t = tokens.shape
    full = model(tokens).logits
    out = model(tokens[:, :prefill], cache=model.init_cache(batch=b, length=16, dtype="float32"))
    steps, cache = [out.logits], out.cache
    for i in range(prefill, t):
        out = model(tokens[:, i:i + 1], positions=jnp.full((b, 1), i), cache=cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


@pytest.mark.slow
def test_pattern_stacks_decode_with_both_caches_like_full_forwards():
    model = Decoder(PATTERN, rngs=nnx.Rngs(1))
    assert_layer_cache_decoding_is_the_full_forward(model, jnp.asarray(TOKENS[:, :10]))
    # The sampler's slot cache: greedy tokens equal argmax over full forwards.
    out = Sampler(model).generate(PROMPTS, max_new_tokens=8)
    for prompt, generated in zip(PROMPTS, out.tokens):
        assert generated == greedy_without_cache(model, prompt, 8)


@pytest.mark.slow
def test_scanned_and_unrolled_pattern_stacks_agree():
    scanned = Decoder(PATTERN, rngs=nnx.Rngs(2))
    unrolled = Decoder(PATTERN.replace(scan_layers=False), rngs=nnx.Rngs(3))
    for name, stack in scanned.stacks.items():
        positions = [stack.blocks] if len(stack.plan.pattern) == 1 else list(stack.blocks)
        targets = [unrolled.stacks[name].blocks] if len(stack.plan.pattern) == 1 else list(unrolled.stacks[name].blocks)
        for stacked, blocks in zip(positions, targets):
            for i, block in enumerate(blocks):
                nnx.update(block, jax.tree.map(lambda x, i=i: x[i], nnx.state(stacked, nnx.Param)))
    nnx.update(unrolled.final_norm, nnx.state(scanned.final_norm))
    unrolled.embed.set_value(scanned.embed.get_value())
    a, b = scanned(jnp.asarray(TOKENS)), unrolled(jnp.asarray(TOKENS))
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.aux, b.aux)


def test_a_merged_model_runs_its_stacks_in_layer_order():
    """`nnx.merge` rebuilds the stacks dict with sorted keys; here the names do not sort in layer order
    ("dense_sliding-moe_full" comes first, "dense_sliding" second), and a merged model must still run the
    layers in order (it ran them swapped before `Decoder.ordered_stacks`)."""
    cfg = tiny(n_layers=5, global_every=2, sliding_window=3,
               moe=MoEConfig(num_experts=4, experts_per_token=2, first_dense_layers=1, sparse_step=2))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    assert [plan.name for plan in plan_stacks(cfg)] != sorted(plan.name for plan in plan_stacks(cfg))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    merged = nnx.merge(*nnx.split(model))
    np.testing.assert_allclose(merged(tokens).logits, model(tokens).logits, atol=1e-5)
