"""Which keys each query sees: the inputs of the attention mask, which every kernel turns into the
blocks it computes (never the whole [T, S] mask unless asked for `dense()`).

Shape letters: B batch, T query length, S key/value length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def visible(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    sliding_window: int = 0,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: key s is visible to query t.

    Same segment, key position at or before the query's, within the sliding window when there is
    one; with row indices q_index [T] and kv_index [S] also key index <= query index (causal).
    """
    q_pos, kv_pos = q_positions[:, :, None], kv_positions[:, None, :]
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_pos <= q_pos)
    if sliding_window:
        mask &= q_pos - kv_pos < sliding_window
    if q_index is not None:
        mask &= (kv_index[None, :] <= q_index[:, None])[None]
    return mask


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    sliding_window: int = 0,
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: a query sees keys of its own document at its position or before.

    Positions restart at 0 in every packed document and segment ids number the documents (0 =
    padding or an empty cache slot), so "same segment and kv_position <= q_position" is causal
    attention within each document; with a sliding window W, only the last W positions are seen.
    """
    return visible(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)[:, None]


class AttentionMask(NamedTuple):
    """Which keys each query sees, as the inputs of `attention_mask` rather than the [B, 1, T, S] mask
    itself, so a kernel builds only the blocks it computes.

    positions/segment ids: [B, T] of the queries, [B, S] of the keys. `causal` (static) additionally
    masks every key that comes after the query in the row (key index > query index + q_offset): true
    of the training path, where queries and keys are the same row in order, and what lets a kernel
    skip the blocks above the diagonal. For rows whose positions strictly increase within each
    document (packed rows), it changes no visible key, and neither does skipping, under `causal`, the
    keys more than `sliding_window` indices before the query (their position is as far back).
    `q_offset` is the row index of the first query ([] int, may be traced): nonzero when the queries
    are one shard of the row (context parallelism). `logit_softcap` (static, 0 = off) caps the scaled
    scores at cap * tanh(score / cap) before the softmax (Gemma 2). `packed` (static) says whether a
    row may hold several documents (the safe default); False promises one document per row followed
    by padding (segment 0), which a kernel may then take as lengths instead of segment ids (cuDNN).
    `sinks` ([N] float, None = none; gpt-oss): per query head, a virtual key every query sees, whose
    score is the learned logit sinks[n] and whose value is zero: it joins the softmax denominator
    only, letting a head put weight on nothing (`softmax_with_sinks`). Taken by the xla, chunked and
    blockwise kernels (`models.config.SINK_ATTENTION_IMPLS`).
    """

    q_positions: jax.Array
    kv_positions: jax.Array
    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    sliding_window: int = 0
    causal: bool = False
    logit_softcap: float = 0.0
    q_offset: jax.Array | int = 0
    packed: bool = True
    sinks: jax.Array | None = None

    def block(self, q_start: int, q_end: int, kv_end: int, kv_start: int = 0) -> jax.Array:
        """Mask [B, 1, q_end - q_start, kv_end - kv_start] of queries [q_start, q_end) over keys [kv_start, kv_end)."""
        q_index = kv_index = None
        if self.causal:
            q_index = jnp.arange(q_start, q_end) + self.q_offset
            kv_index = jnp.arange(kv_start, kv_end)
        return visible(
            self.q_positions[:, q_start:q_end], self.kv_positions[:, kv_start:kv_end],
            self.q_segment_ids[:, q_start:q_end], self.kv_segment_ids[:, kv_start:kv_end],
            self.sliding_window, q_index, kv_index,
        )[:, None]

    def dense(self) -> jax.Array:
        """The whole mask [B, 1, T, S]."""
        return self.block(0, self.q_positions.shape[1], self.kv_positions.shape[1])

    @property
    def static_offset(self) -> bool:
        """Whether the query offset is known at trace time (lets kernels skip blocks statically)."""
        return isinstance(self.q_offset, int)


def soft_cap(scores: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(scores / cap); the identity when cap is 0."""
    return cap * jnp.tanh(scores / cap) if cap else scores


def document_ids(positions: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, bool]:
    """The segment ids [B, T] a layer attends with, and `AttentionMask.packed`: None (the caller packed
    nothing) means one document per row, which lets a kernel take lengths instead of ids (cuDNN)."""
    if segment_ids is None:
        return jnp.ones(positions.shape, jnp.int32), False
    return segment_ids, True


def grouped_sinks(sinks: jax.Array, kv_heads: int) -> jax.Array:
    """sinks [N] -> float32 [K, G]: query head j*G + g's logit at [j, g], as the kernels group heads."""
    return sinks.astype(jnp.float32).reshape(kv_heads, -1)


def sink_gradient(sinks: jax.Array, lse: jax.Array, delta: jax.Array) -> jax.Array:
    """The gradient of grouped sinks [K, G] from a flash backward pass: lse and delta = rowsum(dO * O)
    (less any lse cotangent) shaped [..., K, G, T]. A sink is a key of value zero, so d lse / d sink =
    exp(sink - lse) and its gradient is -sum over queries of exp(sink - lse) * delta."""
    terms = jnp.exp(sinks[:, :, None] - lse) * delta
    return -jnp.sum(terms, axis=(*range(terms.ndim - 3), terms.ndim - 1))


def softmax_with_sinks(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of float32 scores, with `sinks` (broadcastable to scores[..., :1])
    as one more logit whose probability is dropped (None: the plain softmax)."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = jnp.broadcast_to(sinks, (*scores.shape[:-1], 1)).astype(scores.dtype)
    return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
