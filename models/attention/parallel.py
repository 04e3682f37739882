"""Attention on a device mesh: context parallelism, and kernels XLA cannot partition.

Under a `sharding_context` whose rules shard `activation_length` (the `sequence` mesh axis in the
default rules), every activation of the decoder is split along T and only attention needs the other
shards' tokens. `sharded_attention` runs the kernel per shard with `shard_map`: each device keeps its
queries [B/dp, T/cp, N/tp, H] and all-gathers keys, values, positions and segment ids along T
(their gradients reduce-scatter back), and tells the kernel where its queries start in the row
(`AttentionMask.q_offset`) so causal masking and tile skipping stay exact. Pallas kernels (splash) go
through the same `shard_map` even without context parallelism: a custom call has no SPMD rule.
`ring_attention` is the blockwise kernel with the other context-parallel schedule: K/V blocks passed
around a ring of devices instead of gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models.attention.blockwise import (
    BLOCK_KV,
    BLOCK_Q,
    blockwise_attention,
    blockwise_attention_with_lse,
    merge_partial_attention,
)
from models.attention.mask import AttentionMask
from models.attention.xla import MASKED
from models.sharding import current_sharding, logical_to_mesh_spec

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask], jax.Array]

Q_AXES = ("batch", "activation_length", "activation_heads", None)
KV_AXES = ("batch", "activation_length", "activation_kv_heads", None)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_self_attention(q: jax.Array, k: jax.Array, mask: AttentionMask) -> bool:
    """The training path: queries and keys are the same whole row, in order."""
    return mask.causal and mask.static_offset and mask.q_offset == 0 and q.shape[1] == k.shape[1]


class _Layout(NamedTuple):
    """How one call splits over the mesh: `context`, the mesh axes splitting the row (none: no context
    parallelism), and the per-device blocks of the activations [B, T, N, H] and of the ids [B, T]."""

    mesh: Mesh
    context: tuple[str, ...]
    act_spec: P
    ids_spec: P

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.context)

    def run(self, local: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
            mask: AttentionMask) -> jax.Array:
        """`local(q, k, v, q_pos, kv_pos, q_seg, kv_seg)` on each device's blocks."""
        run = jax.shard_map(local, mesh=self.mesh, in_specs=(self.act_spec,) * 3 + (self.ids_spec,) * 4,
                            out_specs=self.act_spec, check_vma=False)
        return run(q, k, v, mask.q_positions, mask.kv_positions, mask.q_segment_ids, mask.kv_segment_ids)


def _layout(q: jax.Array, k: jax.Array, mask: AttentionMask) -> _Layout | None:
    """The layout under the enclosing sharding context (None outside one)."""
    ctx = current_sharding()
    if ctx is None:
        return None
    mesh, rules = ctx
    q_spec = logical_to_mesh_spec(Q_AXES, rules, mesh, q.shape)
    kv_spec = logical_to_mesh_spec(KV_AXES, rules, mesh, k.shape)
    context = _axes(q_spec[1]) if _is_self_attention(q, k, mask) and q_spec[1] == kv_spec[1] else ()
    batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
    # Query head j*G + g reads key/value head j: split heads only where both split alike.
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    row = context if len(context) > 1 else (context[0] if context else None)
    return _Layout(mesh, context, P(batch, row, heads, None), P(batch, row))


def _local_mask(mask: AttentionMask, q_pos, kv_pos, q_seg, kv_seg, offset) -> AttentionMask:
    return mask._replace(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                         q_offset=offset)


def sharded_attention(kernel: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                      manual: bool = False) -> jax.Array:
    """`kernel(q, k, v, mask)` on the mesh of the enclosing sharding context (if any); see the module
    docstring. `manual`: the kernel must see per-device shards (Pallas), even without context parallelism."""
    layout = _layout(q, k, mask)
    if layout is None or (not layout.context and not manual):
        return kernel(q, k, v, mask)  # XLA partitions it (batch and heads), gathering T if it must
    context = layout.context

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        offset = 0
        if context:
            gather = lambda x: jax.lax.all_gather(x, context, axis=1, tiled=True)  # noqa: E731
            k, v, kv_pos, kv_seg = gather(k), gather(v), gather(kv_pos), gather(kv_seg)
            offset = jax.lax.axis_index(context) * q.shape[1]
        return kernel(q, k, v, _local_mask(mask, q_pos, kv_pos, q_seg, kv_seg, offset))

    return layout.run(local, q, k, v, mask)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, block_q: int = BLOCK_Q,
                   block_kv: int = BLOCK_KV) -> jax.Array:
    """Blockwise attention with context parallelism by a ring (Liu et al. 2023), else plain blockwise.

    Each of the C devices on the context axes keeps its queries and, for C steps, attends to the
    key/value block it holds, then passes that block (with its positions and segment ids) to the next
    device (`ppermute`) while receiving the previous one's: no device ever holds the whole row's K/V
    in the forward pass, and each transfer can overlap the next block's compute. Step r on device c
    sees block c - r (mod C); its queries start (c - src) * T/C rows after the block's keys, the
    `q_offset` that keeps causal masking and tile skipping exact (blocks wholly after the queries are
    skipped, so the causal load is as unbalanced as the all-gather's). Partial results merge by their
    log-sum-exps; the backward pass is JAX's transpose of the loop (ppermutes reversed), and keeps each
    step's block for it: O(S) per device, as after an all-gather.
    """
    layout = _layout(q, k, mask)
    if layout is None or not layout.context:
        return blockwise_attention(q, k, v, mask, block_q, block_kv)
    context, shards = layout.context, layout.shards
    to_next = [(i, (i + 1) % shards) for i in range(shards)]

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        here, rows = jax.lax.axis_index(context), q.shape[1]
        out = jnp.zeros((*q.shape[:3], v.shape[-1]), jnp.float32)
        lse = jnp.full(q.shape[:3], MASKED, jnp.float32)
        block = (k, v, kv_pos, kv_seg)
        for step in range(shards):
            k_r, v_r, kv_pos_r, kv_seg_r = block
            # The block came from device (here - step) mod C: the queries' row index minus its first key's.
            offset = jnp.where(here >= step, step * rows, (step - shards) * rows)
            part = blockwise_attention_with_lse(q, k_r, v_r, _local_mask(mask, q_pos, kv_pos_r, q_seg, kv_seg_r, offset),
                                                block_q, block_kv)
            out, lse = merge_partial_attention(out, lse, *part)
            if step < shards - 1:
                block = jax.tree.map(lambda x: jax.lax.ppermute(x, context, to_next), block)
        return out.astype(v.dtype)

    return layout.run(local, q, k, v, mask)
