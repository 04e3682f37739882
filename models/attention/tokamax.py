"""Flash attention on GPU through Google's tokamax kernels (Pallas: Mosaic GPU on Hopper/Blackwell,
Triton elsewhere), masked by per-query key ranges: packed rows without a [T, S] array.

tokamax's `Mask` takes, per query, the first key it may see (`k_start`) and `is_causal` (keys up to
the query's row index, `q_indices` when the queries are a shard of the row); its flash kernels read
only the key blocks inside [min k_start, max row index + 1) of each query block and mask the edges
in-kernel. Packed causal documents are exactly that: query t sees keys [start of t's document, t],
and a sliding window W moves the start up to t - W + 1. These ranges are over row indices; they
equal `AttentionMask`'s position mask on training rows, where each document is one run of equal
segment ids whose positions step by one (what the cuDNN kernel assumes too). Padding (segment 0)
after the documents is one more run, whose queries see the padding before them as in the reference.

Row t's document start is computed from the segment ids of the *key* row, so a context-parallel
query shard (q_offset > 0, traced) reads its starts at rows [q_offset, q_offset + T) of the whole row
and passes those rows as `q_indices`: no fallback there.

What the kernels cannot express goes to the blockwise kernel (`fits` decides, from static properties
only): attention sinks (no tokamax argument), the KV-cache path (`causal=False`: positions are not
row indices there), soft-capped scores with Triton (its backward pass has no soft-cap; Mosaic's has),
and with Mosaic inputs other than bfloat16/float16 (its default precision is half only).

`Mask` and the per-implementation ops are not in tokamax's public API (`tokamax.dot_product_attention`
takes a boolean [T, S] mask, which the kernels would read in full), hence the pinned version and the
`_src` imports. tokamax is imported when a kernel is first traced, not with `models`.

`implementation="xla"` (dense) and `"xla_chunked"` run the same mask through tokamax's XLA ops: how
the tests check the mapping on CPU, where the Pallas GPU kernels cannot run.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from absl import flags as absl_flags

from models.attention.blockwise import blockwise_attention
from models.attention.mask import AttentionMask

Implementation = Literal["mosaic", "triton", "xla", "xla_chunked"]
MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)


def fits(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, implementation: Implementation = "mosaic") -> bool:
    """Whether tokamax's `implementation` takes `mask` as key ranges: causal rows without sinks, no
    soft-cap under Triton, half precision under Mosaic."""
    del k, v  # any key length (context shards), any value head size
    return (mask.causal and mask.sinks is None
            and not (implementation == "triton" and mask.logit_softcap)
            and (implementation != "mosaic" or q.dtype in MOSAIC_DTYPES))


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, S] -> [B, S] int32: the row index of the first token of each token's run of
    equal segment ids (its document, or the padding after the documents)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(first, index, 0), axis=1)


def key_ranges(mask: AttentionMask, q_len: int) -> tuple[jax.Array, jax.Array | None]:
    """For a mask that `fits`: the first key each query sees, k_start [B, 1, T] (heads broadcast), and the
    queries' row indices q_indices [1, 1, T] (None when they are the row's first T, tokamax's default)."""
    q_index = mask.q_offset + jnp.arange(q_len, dtype=jnp.int32)  # [T]
    k_start = jax.lax.dynamic_slice_in_dim(document_starts(mask.kv_segment_ids), mask.q_offset, q_len, axis=1)
    if mask.sliding_window:
        k_start = jnp.maximum(k_start, q_index - (mask.sliding_window - 1))
    q_indices = None if mask.static_offset and mask.q_offset == 0 else q_index[None, None]
    return k_start[:, None], q_indices


def tokamax_arguments(q_len: int, mask: AttentionMask) -> dict[str, Any]:
    """Keyword arguments of a tokamax attention op for a mask that `fits`."""
    from tokamax._src.ops.attention.base import Mask  # noqa: PLC0415  (see the module docstring)

    k_start, q_indices = key_ranges(mask, q_len)
    return dict(mask=Mask(k_start=k_start, is_causal=True), q_indices=q_indices,
                logits_soft_cap=mask.logit_softcap or None)


def default_implementation() -> Implementation:
    """Mosaic on Hopper and Blackwell GPUs (sm90, sm100), Triton on other GPUs."""
    from tokamax._src import gpu_utils  # noqa: PLC0415

    return "mosaic" if gpu_utils.is_sm90() or gpu_utils.is_sm100() else "triton"


def tokamax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                      implementation: Implementation | None = None) -> jax.Array:
    """q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] -> [B, T, N, Hv] by tokamax's `implementation`
    (default: `default_implementation()`) where its key ranges express the mask, else by the blockwise
    kernel (see the module docstring)."""
    implementation = implementation or default_implementation()
    if not fits(q, k, v, mask, implementation):
        return blockwise_attention(q, k, v, mask)
    from tokamax._src.ops.attention.api import IMPLEMENTATIONS  # noqa: PLC0415

    if not absl_flags.FLAGS.is_parsed():
        # tokamax reads its options from absl flags, parsing sys.argv when nothing has: programs not
        # started through absl.app (pytest, argparse scripts) would fail on their own arguments.
        absl_flags.FLAGS.mark_as_parsed()
    op = IMPLEMENTATIONS["mosaic_gpu" if implementation == "mosaic" else implementation]
    return op(q, k, v, **tokamax_arguments(q.shape[1], mask))
