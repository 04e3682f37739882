"""The chunked cross-entropy equals the whole-logits one (loss, metrics, gradients) and never holds
the [B, T, V] float32 logits at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import get_preset
from models.decoder import Decoder
from train.step import chunked_token_loss_sums, next_token_loss, token_loss_sums


def packed_batch(b: int, t: int, vocab: int) -> dict[str, jax.Array]:
    """Row 0: two documents then padding (loss_mask 0); the other rows: one document."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(b, t + 1))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    half = t // 2
    seg[0, half:], pos[0, half:] = 2, np.arange(t - half)
    seg[0, t - 3:] = 0
    mask = (seg > 0).astype(np.float32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "positions": jnp.asarray(pos),
            "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("chunk", [pytest.param(8, marks=pytest.mark.slow), 7])  # 7 pads the last piece
def test_chunked_loss_and_gradients_equal_the_whole_logits(chunk):
    cfg = get_preset("tiny", vocab_size=512, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, n_layers=1, dtype="float32",
                     logit_softcap=30.0)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    batch = packed_batch(2, 24, cfg.vocab_size)

    def loss(model, chunk):
        out = next_token_loss(model, batch, z_loss=1e-2, chunk=chunk)
        return out.total / out.weight, out

    grad = nnx.jit(nnx.grad(loss, has_aux=True), static_argnums=1)
    (want_grads, want), (got_grads, got) = grad(model, 0), grad(model, chunk)
    np.testing.assert_allclose(got.total, want.total, rtol=1e-6)
    assert float(got.weight) == float(want.weight) == 2 * 24 - 3
    for name in ("xent", "z_loss"):
        np.testing.assert_allclose(got.metrics[name], want.metrics[name], rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5), got_grads, want_grads)


def test_loss_takes_its_chunk_from_the_model_config():
    cfg = get_preset("tiny", vocab_size=128, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=1,
                     cross_entropy_chunk=4)
    batch = packed_batch(1, 8, cfg.vocab_size)
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    jaxpr = str(jax.make_jaxpr(lambda state, b: next_token_loss(nnx.merge(graphdef, state), b).total)(state, batch))
    assert "scan" in jaxpr and "f32[1,8,128]" not in jaxpr  # pieces of [1, 4, 128] logits, never the whole row's


def test_chunked_loss_never_holds_the_whole_logits():
    """Compiled scratch of loss + gradient at 1024 tokens x 32K vocabulary: whole logits are 128 MiB
    in float32; pieces of 64 tokens keep the scratch to a fraction."""
    b, t, d, v = 1, 1024, 64, 32768
    hidden, weight = jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets, mask = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32)

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(lambda h, w, tgt, m: sum(loss(h, w, tgt, m)), argnums=(0, 1)))
        return grad.lower(hidden, weight, targets, mask).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda h, w, tgt, m: token_loss_sums(h @ w, tgt, m))
    chunked = temp_bytes(lambda h, w, tgt, m: chunked_token_loss_sums(lambda x: x @ w, h, tgt, m, 64))
    logits_bytes = b * t * v * 4
    assert whole >= logits_bytes and chunked < logits_bytes / 4, (whole, chunked)
