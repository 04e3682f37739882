"""Blockwise (flash) attention in pure JAX: memory linear in the sequence length.

The forward pass runs an online softmax over blocks of keys for each block of queries (Dao et al.
2022): a running maximum m, normaliser l and output accumulator per query, rescaled as each key block
arrives, so no [T, S] array exists, only [block_q, block_kv] tiles. It saves the output and the
log-sum-exp per query; the backward pass (a custom VJP, FlashAttention-2's) recomputes each tile's
probabilities from them. Tiles that the mask rules out wholesale (above the causal diagonal, before
the sliding window) are skipped by the loop bounds, in both passes. Attention sinks (`AttentionMask.sinks`)
start each query's running softmax at the sink's logit (m = sink, l = 1, no value), so the
log-sum-exp includes them; their gradient is -sum over queries of exp(sink - lse) * rowsum(dO * O).

Shapes: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] -> [B, T, N, Hv]; inside, queries are tiled as
[T/bq, B, K, G, bq, H] (G = N / K query heads per key/value head) and keys as [S/bk, B, K, bk, H].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from models.attention.mask import AttentionMask, grouped_sinks, sink_gradient, soft_cap, visible
from models.attention.xla import MASKED

BLOCK_Q = 256  # CPU: 256-tiles beat 128 and 512 from 2K keys on (bench/long_context.py)
BLOCK_KV = 256
_PAD_Q_SEGMENT, _PAD_KV_SEGMENT = -1, -2  # padding rows never match any segment, nor each other


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """The static part of a call: tile sizes, tile counts and the mask's static fields."""

    block_q: int
    block_kv: int
    n_q: int
    n_kv: int
    scale: float
    sliding_window: int
    causal: bool
    logit_softcap: float

    def kv_range(self, i: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Key tiles [lo, hi) that query tile i can see (row index of query 0 is `offset`)."""
        lo, hi = jnp.int32(0), jnp.int32(self.n_kv)
        if self.causal:  # tile j is needed iff j*bk <= last query index
            hi = jnp.clip((offset + (i + 1) * self.block_q - 1) // self.block_kv + 1, 0, self.n_kv)
            if self.sliding_window:  # ... and its last key is within the window of the first query
                lo = jnp.clip((offset + i * self.block_q - self.sliding_window + 1) // self.block_kv, 0, hi)
        return lo, hi

    def q_range(self, j: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Query tiles [lo, hi) that see key tile j: the transpose of `kv_range`."""
        lo, hi = jnp.int32(0), jnp.int32(self.n_q)
        if self.causal:
            lo = jnp.clip((j * self.block_kv - offset) // self.block_q, 0, self.n_q)
            if self.sliding_window:
                last = (j + 1) * self.block_kv - 1 + self.sliding_window - 1 - offset
                hi = jnp.clip(last // self.block_q + 1, lo, self.n_q)
        return lo, hi

    def scores(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """q [B, K, G, bq, H], k [B, K, bk, H] -> scaled, soft-capped scores [B, K, G, bq, bk] float32."""
        raw = jnp.einsum("bkgqh,bksh->bkgqs", q, k, preferred_element_type=jnp.float32) * self.scale
        return soft_cap(raw, self.logit_softcap)

    def visible(self, i: jax.Array, j: jax.Array, offset: jax.Array, q_pos: jax.Array, kv_pos: jax.Array,
                q_seg: jax.Array, kv_seg: jax.Array) -> jax.Array:
        """Tile (i, j) of the mask, [B, 1, 1, bq, bk]."""
        q_index = kv_index = None
        if self.causal:
            q_index = offset + i * self.block_q + jnp.arange(self.block_q)
            kv_index = j * self.block_kv + jnp.arange(self.block_kv)
        return visible(q_pos, kv_pos, q_seg, kv_seg, self.sliding_window, q_index, kv_index)[:, None, None]


def _forward(tiling: _Tiling, q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, sinks):
    """Tiled inputs and sinks [K, G] float32 (or None) -> (out [nq, B, K, G, bq, Hv] in v's dtype, lse
    [nq, B, K, G, bq] float32; MASKED for a query that sees no key and no sink, so that merging partial
    results weighs it 0)."""

    def query_tile(_, tile):
        i, q_i, q_pos_i, q_seg_i = tile
        stats_shape = q_i.shape[:-1]

        def key_tile(j, carry):
            m, denom, acc = carry
            s = tiling.scores(q_i, k[j])
            mask = tiling.visible(i, j, offset, q_pos_i, kv_pos[j], q_seg_i, kv_seg[j])
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASKED), axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
            return m_new, denom * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

        if sinks is None:
            m0, denom0 = jnp.full(stats_shape, MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32)
        else:  # the sink is a key seen first: max = its logit, normaliser exp(0), no value
            m0, denom0 = jnp.broadcast_to(sinks[:, :, None], stats_shape), jnp.ones(stats_shape, jnp.float32)
        init = (m0, denom0, jnp.zeros((*stats_shape, v.shape[-1]), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(*tiling.kv_range(i, offset), key_tile, init)
        seen = denom > 0  # a query that sees no key (padding) gets output 0
        denom = jnp.where(seen, denom, 1.0)
        out = acc / denom[..., None]
        lse = jnp.where(seen, m + jnp.log(denom), MASKED)
        return None, (out.astype(v.dtype), lse)

    _, (out, lse) = jax.lax.scan(query_tile, None, (jnp.arange(tiling.n_q), q, q_pos, q_seg))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tiling: _Tiling, q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, sinks):
    return _forward(tiling, q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, sinks)


def _flash_fwd(tiling: _Tiling, q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, sinks):
    out, lse = _forward(tiling, q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, sinks)
    return (out, lse), ((q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, out, lse), sinks)


def _flash_bwd(tiling: _Tiling, residuals, cotangents):
    residuals, sinks = residuals
    q, k, v = residuals[:3]
    dq, dk, dv = _gradients(tiling, residuals, cotangents)
    d_sinks = None
    if sinks is not None:
        out, lse = residuals[-2:]
        d_out, d_lse = cotangents
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse  # [nq, B, K, G, bq]
        d_sinks = sink_gradient(sinks, lse, delta)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, d_sinks


def _gradients(tiling: _Tiling, residuals, cotangents):
    """FlashAttention-2's backward: per key tile, loop over the query tiles that see it, recomputing
    P = exp(S - lse); dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O) + d_lse), dK += dS^T Q, dQ += dS K
    (d lse / dS = P: the log-sum-exp's own cotangent, nonzero when partial results are merged)."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, offset, out, lse = residuals
    d_out, d_lse = cotangents
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse  # [nq, B, K, G, bq]

    def key_tile(dq, tile):
        j, k_j, v_j, kv_pos_j, kv_seg_j = tile

        def query_tile(i, carry):
            dq, dk, dv = carry
            q_i, d_out_i = q[i], d_out[i]
            s = tiling.scores(q_i, k_j)
            mask = tiling.visible(i, j, offset, q_pos[i], kv_pos_j, q_seg[i], kv_seg_j)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(d_out.dtype), d_out_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqh,bksh->bkgqs", d_out_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None])
            if tiling.logit_softcap:  # d/dx cap * tanh(x / cap) = 1 - (capped / cap)^2
                ds = ds * (1.0 - jnp.square(s / tiling.logit_softcap))
            ds = (ds * tiling.scale).astype(q.dtype)
            dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_j, preferred_element_type=jnp.float32)
            return dq.at[i].add(dq_i), dk, dv

        init = (dq, jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
        dq, dk, dv = jax.lax.fori_loop(*tiling.q_range(j, offset), query_tile, init)
        return dq, (dk, dv)

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_tile, dq0, (jnp.arange(tiling.n_kv), k, v, kv_pos, kv_seg))
    return dq, dk, dv  # float32


_flash.defvjp(_flash_fwd, _flash_bwd)


def _tiles(x: jax.Array, size: int, axis: int, pad_value: int | float = 0) -> jax.Array:
    """Pads `axis` to a multiple of `size` and splits it into [n, size] with n moved to the front."""
    pad = -x.shape[axis] % size
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, constant_values=pad_value)
    x = x.reshape(*x.shape[:axis], x.shape[axis] // size, size, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV
) -> jax.Array:
    """Softmax attention tile by tile with an online softmax; memory O(T + S), never [T, S].

    A query that sees no key gets output 0 (the dense reference would average every value).
    """
    return blockwise_attention_with_lse(q, k, v, mask, block_q, block_kv)[0]


def _query_tiles(x: jax.Array, bq: int, kv_heads: int) -> jax.Array:
    """[B, T, N, ...] -> [nq, B, K, G, bq, ...] (queries, outputs, log-sum-exps)."""
    b, t, n = x.shape[:3]
    tiles = _tiles(x.reshape(b, t, kv_heads, n // kv_heads, *x.shape[3:]), bq, 1)  # [nq, B, bq, K, G, ...]
    return jnp.moveaxis(tiles, 2, 4)


def _untile_queries(tiles: jax.Array, t: int) -> jax.Array:
    """The inverse of `_query_tiles`: [nq, B, K, G, bq, ...] -> [B, T, N, ...]."""
    nq, b, kv_heads, group, bq = tiles.shape[:5]
    x = jnp.moveaxis(jnp.moveaxis(tiles, 4, 2), 0, 1)  # [B, nq, bq, K, G, ...]
    return x.reshape(b, nq * bq, kv_heads * group, *tiles.shape[5:])[:, :t]


def _key_tiles(x: jax.Array, bk: int) -> jax.Array:
    """[B, S, K, H] -> [nk, B, K, bk, H]."""
    return jnp.transpose(_tiles(x, bk, 1), (0, 1, 3, 2, 4))


def _untile_keys(tiles: jax.Array, s: int) -> jax.Array:
    """The inverse of `_key_tiles`."""
    nk, b, kv_heads, bk, h = tiles.shape
    return jnp.transpose(tiles, (1, 0, 3, 2, 4)).reshape(b, nk * bk, kv_heads, h)[:, :s]


def _tiled(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, block_q: int, block_kv: int
           ) -> tuple[_Tiling, tuple[jax.Array, ...]]:
    """The call's tiling and `_flash`'s array arguments (q, k, v, positions, segment ids, offset) in tiles."""
    t, h, s, kv_heads = q.shape[1], q.shape[3], k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_kv, s)
    tiling = _Tiling(bq, bk, -(-t // bq), -(-s // bk), 1.0 / math.sqrt(h), mask.sliding_window, mask.causal,
                     mask.logit_softcap)
    return tiling, (
        _query_tiles(q, bq, kv_heads), _key_tiles(k, bk), _key_tiles(v, bk),
        _tiles(mask.q_positions, bq, 1), _tiles(mask.kv_positions, bk, 1),
        _tiles(mask.q_segment_ids, bq, 1, _PAD_Q_SEGMENT), _tiles(mask.kv_segment_ids, bk, 1, _PAD_KV_SEGMENT),
        jnp.asarray(mask.q_offset, jnp.int32),
    )


def blockwise_attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV
) -> tuple[jax.Array, jax.Array]:
    """`blockwise_attention`'s output [B, T, N, Hv] and each query's log-sum-exp of its visible scores
    [B, T, N] float32 (MASKED where it sees no key), both differentiable: attention over a union of key
    sets is the merge of the parts' (out, lse) (`merge_partial_attention`), as in ring attention."""
    tiling, args = _tiled(q, k, v, mask, block_q, block_kv)
    sinks = None if mask.sinks is None else grouped_sinks(mask.sinks, k.shape[2])
    out, lse = _flash(tiling, *args, sinks)  # [nq, B, K, G, bq, Hv], [nq, B, K, G, bq]
    return _untile_queries(out, q.shape[1]), _untile_queries(lse, q.shape[1])


def blockwise_attention_backward(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, out: jax.Array, lse: jax.Array, d_out: jax.Array,
    block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv), float32, of attention whose output `out` [B, T, N, Hv] and log-sum-exp `lse` [B, T, N]
    were taken over a superset of these keys, given d_out: FlashAttention-2's backward over these keys,
    normalised by the whole softmax (dq sums over key sets; ring attention's backward step)."""
    tiling, args = _tiled(q, k, v, mask, block_q, block_kv)
    kv_heads = k.shape[2]
    residuals = (*args, _query_tiles(out, tiling.block_q, kv_heads), _query_tiles(lse, tiling.block_q, kv_heads))
    d_out_tiles = _query_tiles(d_out, tiling.block_q, kv_heads)
    dq, dk, dv = _gradients(tiling, residuals, (d_out_tiles, jnp.zeros(d_out_tiles.shape[:-1], jnp.float32)))
    return _untile_queries(dq, q.shape[1]), _untile_keys(dk, k.shape[1]), _untile_keys(dv, v.shape[1])


def merge_partial_attention(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """Attention over keys A and B from attention over each: out [B, T, N, Hv] (float32 result), lse [B, T, N]."""
    lse = jnp.logaddexp(lse_a, lse_b)
    weight = lambda part: jnp.exp(part - lse)[..., None]  # noqa: E731
    return out_a.astype(jnp.float32) * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b), lse
