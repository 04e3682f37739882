"""Attention in plain XLA ops: the dense reference and the query-chunked kernel.

q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] -> [B, T, N, Hv]; query head j*G + g uses key/value
head j (G = N / K), without repeating the keys. Scores and softmax are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.attention.mask import AttentionMask, grouped_sinks, soft_cap, softmax_with_sinks

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


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """Softmax attention in XLA, `query_chunk` queries at a time.

    A causal mask lets the chunk of queries [c0, c1) read keys [0, c1) only (and, with a sliding
    window W, from c0 - W + 1), so the scores outside are neither computed nor kept for the backward
    pass (for T = 4 chunks, 10 of 16 blocks); each chunk builds its own mask block. Heads are moved in
    front of the sequence once, so the per-chunk products need no transposes. Each chunk's scores
    over its keys are materialised: memory grows as T * S, see `blockwise_attention` for long rows.
    """
    t, s = q.shape[1], k.shape[1]
    q_t = grouped_heads(q, k.shape[2])  # [B, K, G, T, H]
    k_t, v_t = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, K, S, H]
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for start in range(0, t, query_chunk):
        end = min(start + query_chunk, t)
        lo, hi = key_range(mask, start, end, s)
        scores = jnp.einsum("bkgth,bksh->bkgts", q_t[:, :, :, start:end], k_t[:, :, lo:hi],
                            preferred_element_type=jnp.float32)
        scores = soft_cap(scores * scale, mask.logit_softcap)
        scores = jnp.where(mask.block(start, end, hi, lo)[:, :, None], scores, MASKED)
        probs = softmax_with_sinks(scores, _sink_logits(mask, k.shape[2])).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, v_t[:, :, lo:hi]))
    return ungrouped_heads(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3))
