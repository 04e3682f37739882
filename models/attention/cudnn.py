"""cuDNN's fused flash attention (GPU) through `jax.nn.dot_product_attention`, masked by its arguments.

The public API expresses the training path's mask without a [T, S] array: `is_causal` (cuDNN
computes only the tiles on or below the diagonal), `local_window_size=(W - 1, 0)` (the last W keys)
and `query_seq_lengths` / `key_value_seq_lengths` (each row one document, then right padding, whose
queries get output 0 as in the blockwise kernel). These masks are over row indices; they equal
`AttentionMask`'s position mask when positions step by one along the row, as on the training path.
A dense boolean `mask` argument, by contrast, is read in full by cuDNN (a [B, 1, T, S] array in HBM
and no tile skipping).

Calls those arguments cannot express go to the blockwise kernel (`fits` decides, from static
properties only: never from the values of traced segment ids):

- packed rows (`AttentionMask.packed`): the public API takes no segment ids. cuDNN's packed layout
  exists in `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (per-row document
  lengths [B, M] and offsets [B, M + 1], M the most documents per row, fixed at trace time), but it is
  private, needs Hopper, and would make every packing change retrace on M, so it is not used here;
- soft-capped scores (no cuDNN option), a value head size unlike the key's (jax.nn requires v shaped
  like k), and the KV-cache path and context-parallel query shards (jax.nn's causal mask is aligned
  top-left: query i sees keys 0..i of the same row);
- with `implementation="cudnn"`, inputs other than bfloat16/float16 (cuDNN's flash kernel has no
  float32 path).

`implementation="xla"` runs the same arguments through jax.nn's XLA path: how the tests check the
mapping on CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from models.attention.blockwise import blockwise_attention
from models.attention.mask import AttentionMask

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def fits(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> bool:
    """Whether jax.nn's mask arguments express `mask`: causal self-attention of whole unpacked rows,
    no soft-cap or sinks, values shaped like keys."""
    return (mask.causal and not mask.packed and not mask.logit_softcap and mask.sinks is None
            and mask.static_offset and mask.q_offset == 0
            and q.shape[1] == k.shape[1] and v.shape[-1] == k.shape[-1])


def dot_product_arguments(mask: AttentionMask) -> dict[str, Any]:
    """`jax.nn.dot_product_attention` keyword arguments for a mask that `fits`: causal, the window as
    (W - 1 keys back, 0 ahead), each row's length the count of its non-padding tokens."""
    lengths = jnp.sum(mask.q_segment_ids != 0, axis=1, dtype=jnp.int32)  # [B]
    return dict(is_causal=True, local_window_size=(mask.sliding_window - 1, 0) if mask.sliding_window else None,
                query_seq_lengths=lengths, key_value_seq_lengths=lengths)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                    implementation: Literal["cudnn", "xla"] = "cudnn") -> jax.Array:
    """q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H] by jax.nn.dot_product_attention where its mask
    arguments fit, else by the blockwise kernel (see the module docstring)."""
    if not fits(q, k, v, mask) or (implementation == "cudnn" and q.dtype not in CUDNN_DTYPES):
        return blockwise_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **dot_product_arguments(mask))
