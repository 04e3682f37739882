"""Attention kernels behind one seam.

A kernel is `fn(q, k, v, mask: AttentionMask) -> out`: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]
(K divides N; query head j*G + g reads key/value head j) -> [B, T, N, Hv]. The mask arrives as its
inputs (positions, segment ids, causal, window, soft-cap), never as a [T, S] array, and each kernel
builds the blocks it computes. Each kernel lists the platforms it runs on (None: all).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from models.attention.mask import AttentionMask, attention_mask, soft_cap, visible
from models.attention.xla import QUERY_CHUNK, chunked_attention, reference_attention

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask], jax.Array]


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    # jax.nn's cuDNN entry takes no segment ids, so packed rows need the dense mask.
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="cudnn")


ATTENTION_KERNELS: dict[str, tuple[AttentionFn, tuple[str, ...] | None]] = {
    "xla": (chunked_attention, None),
    "cudnn": (_cudnn_attention, ("gpu",)),
}


def register_attention_kernel(name: str, fn: AttentionFn, platforms: tuple[str, ...] | None = None) -> None:
    ATTENTION_KERNELS[name] = (fn, platforms)


def available_attention_kernels(platform: str | None = None) -> list[str]:
    """Kernel names that run on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return sorted(name for name, (_, platforms) in ATTENTION_KERNELS.items() if platforms is None or platform in platforms)


def attention_kernel(name: str) -> AttentionFn:
    available = available_attention_kernels()
    if name not in available:
        raise ValueError(
            f"attention_impl: no kernel {name!r} on platform {jax.default_backend()!r}; available: {', '.join(available)}"
        )
    return ATTENTION_KERNELS[name][0]


__all__ = [
    "ATTENTION_KERNELS", "QUERY_CHUNK", "AttentionFn", "AttentionMask", "attention_kernel", "attention_mask",
    "available_attention_kernels", "chunked_attention", "reference_attention", "register_attention_kernel",
    "soft_cap", "visible",
]
