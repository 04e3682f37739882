"""Attention kernels behind one seam.

A kernel is `fn(q, k, v, mask: AttentionMask) -> out`: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]
(K divides N; query head j*G + g reads key/value head j) -> [B, T, N, Hv]. The mask arrives as its
inputs (positions, segment ids, causal, window, soft-cap), never as a [T, S] array, and each kernel
builds the blocks it computes. Each kernel lists the platforms it runs on (None: all).

    xla        chunked below LONG_SEQUENCE keys, blockwise from there (the default)
    chunked    query chunks over all their keys (fastest on CPU for short rows; memory ~ T * S)
    blockwise  flash attention in pure JAX (memory ~ T + S), the fallback everywhere
    cudnn      GPU, jax.nn.dot_product_attention's cuDNN kernel where its mask arguments fit, else
               blockwise (models/attention/cudnn.py)
    splash     TPU, JAX's Pallas splash-attention kernel (models/attention/splash.py)
    tokamax    GPU, tokamax's Pallas flash kernels (Mosaic GPU on Hopper/Blackwell, else Triton) with the mask
               as per-query key ranges: packed rows, windows, soft-cap, context shards; blockwise for the
               rest (models/attention/tokamax.py)
    ring       blockwise, with context parallelism by K/V blocks passed round a ring of devices instead
               of all-gathered (models/attention/parallel.py); no attention sinks

Under context parallelism every kernel but `ring` runs on all-gathered keys and values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax

from models.attention.blockwise import blockwise_attention
from models.attention.cudnn import cudnn_attention
from models.attention.mask import AttentionMask, attention_mask, soft_cap, visible
from models.attention.parallel import ring_attention, sharded_attention
from models.attention.splash import splash_attention
from models.attention.tokamax import tokamax_attention
from models.attention.xla import QUERY_CHUNK, chunked_attention, reference_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask], jax.Array]

# Keys per row from which "xla" switches to the blockwise kernel: on CPU the chunked kernel is as
# fast at 512 and slower from 2K on (bench/long_context.py, `kernels`).
LONG_SEQUENCE = 1024


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """The chunked kernel for short rows, the blockwise one for long rows (memory linear in T)."""
    kernel = chunked_attention if k.shape[1] <= LONG_SEQUENCE else blockwise_attention
    return kernel(q, k, v, mask)


class Kernel(NamedTuple):
    fn: AttentionFn
    platforms: tuple[str, ...] | None = None  # None: every platform
    manual: bool = False  # XLA cannot partition it (Pallas): run per device shard (models/attention/parallel.py)
    distributes_itself: bool = False  # handles context parallelism on its own (ring), not through the all-gather


ATTENTION_KERNELS: dict[str, Kernel] = {
    "xla": Kernel(xla_attention),
    "chunked": Kernel(chunked_attention),
    "blockwise": Kernel(blockwise_attention),
    "cudnn": Kernel(cudnn_attention, ("gpu",)),
    "splash": Kernel(splash_attention, ("tpu",), manual=True),
    "tokamax": Kernel(tokamax_attention, ("gpu",), manual=True),
    "ring": Kernel(ring_attention, distributes_itself=True),
}


def register_attention_kernel(name: str, fn: AttentionFn, platforms: tuple[str, ...] | None = None,
                              manual: bool = False, distributes_itself: bool = False) -> None:
    ATTENTION_KERNELS[name] = Kernel(fn, platforms, manual, distributes_itself)


def available_attention_kernels(platform: str | None = None) -> list[str]:
    """Kernel names that run on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return sorted(name for name, kernel in ATTENTION_KERNELS.items() if kernel.platforms is None or platform in kernel.platforms)


def attention_kernel(name: str) -> AttentionFn:
    """The kernel `name` for this platform, run on the mesh of the enclosing sharding context (context
    parallelism when the rules shard the sequence)."""
    available = available_attention_kernels()
    if name not in available:
        raise ValueError(
            f"attention_impl: no kernel {name!r} on platform {jax.default_backend()!r}; available: {', '.join(available)}"
        )
    kernel = ATTENTION_KERNELS[name]
    if kernel.distributes_itself:
        return kernel.fn
    return functools.partial(sharded_attention, kernel.fn, manual=kernel.manual)


__all__ = [
    "ATTENTION_KERNELS", "LONG_SEQUENCE", "QUERY_CHUNK", "AttentionFn", "AttentionMask", "Kernel", "attention_kernel",
    "attention_mask", "available_attention_kernels", "blockwise_attention", "chunked_attention", "cudnn_attention", "reference_attention",
    "register_attention_kernel", "ring_attention", "sharded_attention", "soft_cap", "splash_attention", "tokamax_attention", "visible",
    "xla_attention",
]
