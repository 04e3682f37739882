"""The TPU splash-attention kernel (JAX's Pallas ops) behind the seam.

Splash takes a static block-sparse mask over row indices (causal, or a local window) and-ed with
segment ids, per batch element: q [N, T, H], k/v [K, S, H] (grouped heads when K < N). Index masks
equal the position masks of `AttentionMask` on the training path, where positions step by one within
each packed document; other calls (the KV-cache path, a context-parallel shard of the queries, rows
that do not tile) go to the blockwise kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from models.attention.blockwise import blockwise_attention
from models.attention.mask import AttentionMask

BLOCK = 512  # the TPU tile: large tiles amortise the per-step overhead of the grid


def splash_mask(n_heads: int, length: int, sliding_window: int) -> masks.MultiHeadMask:
    """Causal [N, T, T] mask over row indices, limited to the last `sliding_window` keys when set."""
    if sliding_window:
        head = masks.LocalMask((length, length), window_size=(sliding_window - 1, 0), offset=0)
    else:
        head = masks.CausalMask((length, length))
    return masks.MultiHeadMask([head] * n_heads)


@functools.lru_cache(maxsize=32)
def splash_kernel(n_heads: int, length: int, sliding_window: int, logit_softcap: float, block: int,
                  interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for one shape (building it preprocesses the block mask in numpy: once per shape)."""
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(
        splash_mask(n_heads, length, sliding_window), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        attn_logits_soft_cap=logit_softcap or None, interpret=interpret,
    )


def fits(q: jax.Array, k: jax.Array, mask: AttentionMask, block: int) -> bool:
    """Whether splash computes this call: causal self-attention of whole rows that tile into `block`,
    without sinks."""
    t = q.shape[1]
    return (mask.causal and mask.static_offset and mask.q_offset == 0 and k.shape[1] == t and mask.sinks is None
            and t % min(block, t) == 0 and min(block, t) % 128 == 0)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, block: int = BLOCK,
                     interpret: bool = False) -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H] with the splash kernel (see the module docstring);
    `interpret` runs the Pallas kernel in interpret mode (any backend, for tests)."""
    if not fits(q, k, mask, block):
        return blockwise_attention(q, k, v, mask)
    t, n, h = q.shape[1], q.shape[2], q.shape[3]
    kernel = splash_kernel(n, t, mask.sliding_window, float(mask.logit_softcap), min(block, t), interpret)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, T, N, H] <-> [B, N, T, H]

    def one_row(q, k, v, q_seg, kv_seg):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q_seg, kv_seg))

    scaled = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # splash does not scale the scores
    out = jax.vmap(one_row)(heads_first(scaled), heads_first(k), heads_first(v), mask.q_segment_ids, mask.kv_segment_ids)
    return heads_first(out)
