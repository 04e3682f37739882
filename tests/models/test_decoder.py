"""Decoder behaviour: packed documents stay independent, the KV cache reproduces a full forward,
scanned and unrolled layer stacks compute the same function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import get_preset
from models.decoder import Decoder, head_logits


def tiny(**overrides):
    return get_preset("tiny", vocab_size=128, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, **overrides)


@pytest.fixture(scope="module")
def model():
    return Decoder(tiny(), rngs=nnx.Rngs(0))


def test_packed_documents_do_not_attend_across_boundaries(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, size=(1, 12))
    segments = np.array([[1] * 5 + [2] * 4 + [3] * 3])
    positions = np.array([list(range(5)) + list(range(4)) + list(range(3))])
    edited = tokens.copy()
    edited[0, 5:9] = rng.integers(0, 128, size=4)  # change document 2 only

    def logits(t):
        return np.asarray(model(jnp.asarray(t), jnp.asarray(positions), jnp.asarray(segments)).logits)

    before, after = logits(tokens), logits(edited)
    untouched = segments[0] != 2
    np.testing.assert_allclose(before[0, untouched], after[0, untouched], atol=1e-6)
    assert not np.allclose(before[0, ~untouched], after[0, ~untouched])
    # A packed document computes exactly what it computes alone.
    alone = np.asarray(model(jnp.asarray(tokens[:, 9:])).logits)
    np.testing.assert_allclose(before[0, 9:], alone[0], atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 3}, {"qk_norm": True, "qkv_bias": True}])
def test_incremental_decoding_with_cache_matches_full_forward(overrides):
    model = Decoder(tiny(**overrides), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, size=(2, 10)))
    full = model(tokens).logits
    cache = model.init_cache(batch=2, length=16, dtype="float32")
    out = model(tokens[:, :6], cache=cache)  # prefill 6 tokens, then one at a time
    steps = [out.logits]
    cache = out.cache
    for t in range(6, 10):
        out = model(tokens[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache)
        steps.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_scanned_and_unrolled_stacks_agree():
    scanned = Decoder(tiny(), rngs=nnx.Rngs(2))
    unrolled = Decoder(tiny(scan_layers=False), rngs=nnx.Rngs(3))
    stacked = nnx.state(scanned.stacks["dense"].blocks, nnx.Param)
    for i, block in enumerate(unrolled.stacks["dense"].blocks):
        nnx.update(block, jax.tree.map(lambda x, i=i: x[i], stacked))
    nnx.update(unrolled.final_norm, nnx.state(scanned.final_norm))
    unrolled.embed.set_value(scanned.embed.get_value())
    tokens = jnp.arange(16).reshape(2, 8)
    np.testing.assert_allclose(scanned(tokens).logits, unrolled(tokens).logits, atol=1e-5)


def test_remat_policies_do_not_change_gradients():
    tokens = jnp.arange(16).reshape(2, 8) % 128

    def grads(remat):
        model = Decoder(tiny(remat=remat), rngs=nnx.Rngs(4))
        return nnx.grad(lambda m: m(tokens).logits.mean())(model)

    reference = grads("none")
    for policy in ("full", "dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), reference, grads(policy))


def test_logit_softcap_bounds_logits():
    model = Decoder(tiny(logit_softcap=0.05), rngs=nnx.Rngs(5))
    assert float(jnp.abs(model(jnp.arange(8)[None]).logits).max()) <= 0.05 + 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_logits_gradients_equal_autodiff(dtype):
    """The LM head's own backward pass gives autodiff's gradients of the plain product, in the inputs' dtypes."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), dtype)
    w = jnp.asarray(rng.normal(size=(8, 11)), dtype)
    weights = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jax.nn.log_softmax(fn(x, w)) * weights)

    plain = lambda x, w: jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)  # noqa: E731
    got, want = (jax.grad(loss(fn), argnums=(0, 1))(x, w) for fn in (head_logits, plain))
    np.testing.assert_allclose(head_logits(x, w), plain(x, w), rtol=1e-6)
    for g, e in zip(got, want):
        assert g.dtype == e.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=1e-5 if dtype == jnp.float32 else 1e-2,
                                   atol=1e-5 if dtype == jnp.float32 else 1e-2)
