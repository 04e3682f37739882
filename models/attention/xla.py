"""Attention in plain XLA ops: the dense reference and the query-chunked kernel.

q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] -> [B, T, N, Hv]; query head j*G + g uses key/value
head j (G = N / K), without repeating the keys. Scores and softmax are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from models.attention.mask import AttentionMask, grouped_sinks, sink_gradient, soft_cap, softmax_with_sinks

QUERY_CHUNK = 128
MASKED = float(jnp.finfo(jnp.float32).min)


def grouped_heads(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, N, H] -> [B, K, G, T, H]: heads grouped by the key/value head they read, in front of T."""
    b, t, n, h = q.shape
    return jnp.transpose(q.reshape(b, t, kv_heads, n // kv_heads, h), (0, 2, 3, 1, 4))


def ungrouped_heads(out: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H], the inverse of `grouped_heads`."""
    b, kv_heads, group, t, h = out.shape
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, kv_heads * group, h)


def _sink_logits(mask: AttentionMask, kv_heads: int) -> jax.Array | None:
    """mask.sinks as [K, G, 1, 1], broadcasting over [B, K, G, T, 1] scores (None without sinks)."""
    return None if mask.sinks is None else grouped_sinks(mask.sinks, kv_heads)[:, :, None, None]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Softmax attention over the dense [B, 1, T, S] mask: the reference every kernel is tested against."""
    q_t = grouped_heads(q, k.shape[2])
    scores = jnp.einsum("bkgth,bskh->bkgts", q_t, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask.dense()[:, :, None], soft_cap(scores, mask.logit_softcap), MASKED)
    probs = softmax_with_sinks(scores, _sink_logits(mask, k.shape[2])).astype(v.dtype)
    return ungrouped_heads(jnp.einsum("bkgts,bskh->bkgth", probs, v))


def key_range(mask: AttentionMask, q_start: int, q_end: int, s: int) -> tuple[int, int]:
    """Keys [lo, hi) a static chunk of queries [q_start, q_end) can see: with `causal` and a static
    offset, none after the last query and none more than the window before the first."""
    if not (mask.causal and mask.static_offset):
        return 0, s
    offset = int(mask.q_offset)
    hi = min(q_end + offset, s)
    lo = max(q_start + offset - mask.sliding_window + 1, 0) if mask.sliding_window else 0
    return min(lo, hi), hi


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """The static part of a chunked call: each chunk's queries [start, end) and the keys [lo, hi) it
    reads, the score scale and the mask's static fields."""

    bounds: tuple[tuple[int, int, int, int], ...]
    scale: float
    sliding_window: int
    causal: bool
    logit_softcap: float

    def scores(self, q_t: jax.Array, k_t: jax.Array, ids: tuple[jax.Array, ...], bound: tuple[int, int, int, int]
               ) -> tuple[jax.Array, jax.Array]:
        """Chunk `bound`'s soft-capped, scaled scores [B, K, G, tq, kv] float32 (not masked) and its mask
        [B, 1, 1, tq, kv]; q_t [B, K, G, T, H], k_t [B, K, S, H], ids the mask's arrays."""
        start, end, lo, hi = bound
        raw = jnp.einsum("bkgth,bksh->bkgts", q_t[:, :, :, start:end], k_t[:, :, lo:hi],
                         preferred_element_type=jnp.float32)
        mask = AttentionMask(*ids[:4], self.sliding_window, self.causal, q_offset=ids[4]).block(start, end, hi, lo)
        return soft_cap(raw * self.scale, self.logit_softcap), mask[:, :, None]


def _chunked_forward(chunks: _Chunks, q_t, k_t, v_t, ids, sinks):
    """-> (out [B, K, G, T, Hv] in v's dtype, lse [B, K, G, T] float32): per chunk, the masked scores'
    maximum m, unnormalised probabilities exp(s - m) into the value product, divided by their sum l
    afterwards (on [tq, Hv], not [tq, kv]); lse = m + log l."""
    outs, lses = [], []
    for bound in chunks.bounds:
        scores, mask = chunks.scores(q_t, k_t, ids, bound)
        scores = jnp.where(mask, scores, MASKED)
        m = jnp.max(scores, axis=-1)
        if sinks is not None:  # a key every query sees, scored sinks[k, g], with value zero
            m = jnp.maximum(m, sinks[:, :, None])
        p = jnp.exp(scores - m[..., None])
        denom = jnp.sum(p, axis=-1)
        if sinks is not None:
            denom = denom + jnp.exp(sinks[:, :, None] - m)
        lo, hi = bound[2:]
        pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(v_t.dtype), v_t[:, :, lo:hi], preferred_element_type=jnp.float32)
        outs.append((pv / denom[..., None]).astype(v_t.dtype))
        lses.append(m + jnp.log(denom))
    concat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=3)  # noqa: E731
    return concat(outs), concat(lses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(chunks: _Chunks, q_t, k_t, v_t, ids, sinks):
    return _chunked_forward(chunks, q_t, k_t, v_t, ids, sinks)[0]


def _chunked_fwd(chunks: _Chunks, q_t, k_t, v_t, ids, sinks):
    out, lse = _chunked_forward(chunks, q_t, k_t, v_t, ids, sinks)
    return out, (q_t, k_t, v_t, ids, sinks, out, lse)


def _chunked_bwd(chunks: _Chunks, residuals, d_out):
    """Per chunk, P = exp(S - lse) recomputed from q and k instead of kept from the forward pass;
    dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK += dS^T Q. The key gradients are
    accumulated transposed, [B, K, H, S], so that the products contract the small q/dO chunks
    transposed rather than the [tq, kv] probabilities."""
    q_t, k_t, v_t, ids, sinks, out, lse = residuals
    s = k_t.shape[2]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    d_q, d_k_t, d_v_t = [], 0.0, 0.0
    for bound in chunks.bounds:
        start, end, lo, hi = bound
        scores, mask = chunks.scores(q_t, k_t, ids, bound)
        p = jnp.where(mask, jnp.exp(scores - lse[..., start:end, None]), 0.0)
        q_c, d_out_c = q_t[:, :, :, start:end], d_out[:, :, :, start:end]
        d_v_c = jnp.einsum("bkgth,bkgts->bkhs", d_out_c, p.astype(d_out.dtype), preferred_element_type=jnp.float32)
        d_p = jnp.einsum("bkgth,bksh->bkgts", d_out_c, v_t[:, :, lo:hi], preferred_element_type=jnp.float32)
        d_s = p * (d_p - delta[..., start:end, None])
        if chunks.logit_softcap:  # d/dx cap * tanh(x / cap) = 1 - (capped / cap)^2
            d_s = d_s * (1.0 - jnp.square(scores / chunks.logit_softcap))
        d_s = (d_s * chunks.scale).astype(q_t.dtype)
        d_q.append(jnp.einsum("bkgts,bksh->bkgth", d_s, k_t[:, :, lo:hi], preferred_element_type=jnp.float32))
        d_k_c = jnp.einsum("bkgth,bkgts->bkhs", q_c, d_s, preferred_element_type=jnp.float32)
        keys = [(0, 0)] * 3 + [(lo, s - hi)]
        d_k_t, d_v_t = d_k_t + jnp.pad(d_k_c, keys), d_v_t + jnp.pad(d_v_c, keys)
    d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=3)
    d_sinks = None if sinks is None else sink_gradient(sinks, lse, delta)
    to_keys = lambda x, like: jnp.swapaxes(x, 2, 3).astype(like.dtype)  # noqa: E731  [B, K, H, S] -> [B, K, S, H]
    return d_q.astype(q_t.dtype), to_keys(d_k_t, k_t), to_keys(d_v_t, v_t), None, d_sinks


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """Softmax attention in XLA, `query_chunk` queries at a time.

    A causal mask lets the chunk of queries [c0, c1) read keys [0, c1) only (and, with a sliding
    window W, from c0 - W + 1), so the scores outside are never computed (for T = 4 chunks, 10 of 16
    blocks); each chunk builds its own mask block. Heads are moved in front of the sequence once, so
    the per-chunk products need no transposes. The backward pass (a custom VJP) keeps the output and
    each query's log-sum-exp and recomputes each chunk's probabilities from q and k, rather than
    keeping them all (under the layer scan, every layer's [T, S] probabilities were a stacked,
    zero-filled buffer). The chunks are unrolled and XLA keeps several chunks' score blocks live at
    once: scratch still grows as T * S; see `blockwise_attention` for long rows.
    """
    t, s, kv_heads = q.shape[1], k.shape[1], k.shape[2]
    bounds = tuple((start, min(start + query_chunk, t), *key_range(mask, start, min(start + query_chunk, t), s))
                   for start in range(0, t, query_chunk))
    chunks = _Chunks(bounds, 1.0 / math.sqrt(q.shape[-1]), mask.sliding_window, mask.causal, mask.logit_softcap)
    k_t, v_t = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, K, S, H]
    ids = (mask.q_positions, mask.kv_positions, mask.q_segment_ids, mask.kv_segment_ids,
           jnp.asarray(mask.q_offset, jnp.int32))
    sinks = None if mask.sinks is None else grouped_sinks(mask.sinks, kv_heads)
    return ungrouped_heads(_chunked(chunks, grouped_heads(q, kv_heads), k_t, v_t, ids, sinks))
