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

import dataclasses
import functools
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
    blockwise_attention_backward,
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
        """`local(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks)` on each device's blocks; the attention
        sinks [N] (or None) split like the query heads."""
        run = jax.shard_map(local, mesh=self.mesh,
                            in_specs=(self.act_spec,) * 3 + (self.ids_spec,) * 4 + (P(self.act_spec[2]),),
                            out_specs=self.act_spec, check_vma=False)
        return run(q, k, v, mask.q_positions, mask.kv_positions, mask.q_segment_ids, mask.kv_segment_ids, mask.sinks)


def _layout(q: jax.Array, k: jax.Array, mask: AttentionMask) -> _Layout | None:
    """The layout under the enclosing sharding context (None outside one)."""
    ctx = current_sharding()
    if ctx is None:
        return None
    mesh, rules = ctx
    q_spec = logical_to_mesh_spec(Q_AXES, rules, mesh, q.shape)
    kv_spec = logical_to_mesh_spec(KV_AXES, rules, mesh, k.shape)
    context = _axes(q_spec[1]) if _is_self_attention(q, k, mask) and q_spec[1] == kv_spec[1] else ()
    # A one-device axis splits nothing: kept, it would put the kernel in a shard_map with a traced
    # query offset, and the kernels skip the blocks above the causal diagonal only for a static one.
    context = tuple(a for a in context if mesh.shape[a] > 1)
    batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
    # Query head j*G + g reads key/value head j: split heads only where both split alike.
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    row = context if len(context) > 1 else (context[0] if context else None)
    return _Layout(mesh, context, P(batch, row, heads, None), P(batch, row))


def _local_mask(mask: AttentionMask, q_pos, kv_pos, q_seg, kv_seg, sinks, offset) -> AttentionMask:
    return mask._replace(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                         sinks=sinks, q_offset=offset)


def sharded_attention(kernel: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                      manual: bool = False) -> jax.Array:
    """`kernel(q, k, v, mask)` on the mesh of the enclosing sharding context (if any); see the module
    docstring. `manual`: the kernel must see per-device shards (Pallas), even without context parallelism."""
    layout = _layout(q, k, mask)
    if layout is None or (not layout.context and not manual):
        return kernel(q, k, v, mask)  # XLA partitions it (batch and heads), gathering T if it must
    context = layout.context

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
        offset = 0
        if context:
            gather = lambda x: jax.lax.all_gather(x, context, axis=1, tiled=True)  # noqa: E731
            k, v, kv_pos, kv_seg = gather(k), gather(v), gather(kv_pos), gather(kv_seg)
            offset = jax.lax.axis_index(context) * q.shape[1]
        return kernel(q, k, v, _local_mask(mask, q_pos, kv_pos, q_seg, kv_seg, sinks, offset))

    return layout.run(local, q, k, v, mask)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static part of a ring: the context axes, their device count C, the mask's static fields
    (its arrays are replaced per block) and the kernel's tiles."""

    context: tuple[str, ...]
    shards: int
    mask: AttentionMask
    block_q: int
    block_kv: int

    def block_mask(self, here: jax.Array, step: jax.Array | int, rows: int, q_pos, kv_pos, q_seg, kv_seg
                   ) -> AttentionMask:
        """Step `step`'s block came from device (here - step) mod C: the queries start `offset` rows
        after its first key (negative: the block lies after them, and the tile bounds skip it)."""
        offset = jnp.where(here >= step, step * rows, (step - self.shards) * rows)
        return _local_mask(self.mask, q_pos, kv_pos, q_seg, kv_seg, None, offset)

    def pass_on(self, arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        """Each device's arrays to the next device on the ring."""
        to_next = [(i, (i + 1) % self.shards) for i in range(self.shards)]
        return tuple(jax.lax.ppermute(x, self.context, to_next) for x in arrays)

    def forward(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
        """This device's queries over every block as it passes: (out [B, T/C, N, Hv], lse [B, T/C, N])."""
        here = jax.lax.axis_index(self.context)

        def attend(step, block, out, lse):
            k_r, v_r, kv_pos_r, kv_seg_r = block
            mask = self.block_mask(here, step, q.shape[1], q_pos, kv_pos_r, q_seg, kv_seg_r)
            return merge_partial_attention(out, lse, *blockwise_attention_with_lse(q, k_r, v_r, mask, self.block_q,
                                                                                   self.block_kv))

        def next_block(carry, step):  # a scan, not an unrolled loop: one step's buffers live at a time
            block, out, lse = carry
            block = self.pass_on(block)
            return (block, *attend(step, block, out, lse)), None

        out = jnp.zeros((*q.shape[:3], v.shape[-1]), jnp.float32)
        lse = jnp.full(q.shape[:3], MASKED, jnp.float32)
        block = (k, v, kv_pos, kv_seg)
        (_, out, lse), _ = jax.lax.scan(next_block, (block, *attend(0, block, out, lse)), jnp.arange(1, self.shards))
        return out.astype(v.dtype), lse

    def backward(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out):
        """The blocks go round again, each with its dK/dV accumulating on every device it visits (the
        probabilities are exp(score - lse) with the whole row's lse); the C-th pass brings every block
        and its gradients back to the block's owner."""
        here = jax.lax.axis_index(self.context)

        def step_back(carry, step):
            dq, block = carry
            k_r, v_r, kv_pos_r, kv_seg_r, dk, dv = block
            mask = self.block_mask(here, step, q.shape[1], q_pos, kv_pos_r, q_seg, kv_seg_r)
            dq_r, dk_r, dv_r = blockwise_attention_backward(q, k_r, v_r, mask, out, lse, d_out, self.block_q,
                                                            self.block_kv)
            return (dq + dq_r, self.pass_on((k_r, v_r, kv_pos_r, kv_seg_r, dk + dk_r, dv + dv_r))), None

        block = (k, v, kv_pos, kv_seg, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        (dq, block), _ = jax.lax.scan(step_back, (jnp.zeros(q.shape, jnp.float32), block), jnp.arange(self.shards))
        dk, dv = block[4:]
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return ring.forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _ring_fwd(ring: _Ring, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = ring.forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(ring: _Ring, residuals, d_out):
    return (*ring.backward(*residuals, d_out), None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, block_q: int = BLOCK_Q,
                   block_kv: int = BLOCK_KV) -> jax.Array:
    """Blockwise attention with context parallelism by a ring (Liu et al. 2023), else plain blockwise.

    Each of the C devices on the context axes keeps its queries and, for C steps, attends to the
    key/value block it holds, then passes that block (with its positions and segment ids) to the next
    device (`ppermute`) while receiving the previous one's: no device ever holds more than its own and
    one passing block, and each transfer can overlap the next block's compute. Partial results merge
    by their log-sum-exps. Blocks wholly after a device's queries are skipped by the tile bounds, so
    the causal load is as unbalanced as the all-gather's. The backward pass (a custom VJP) saves only
    the output and log-sum-exp, and sends the blocks round again with their dK/dV (`_Ring.backward`).
    No attention sinks: each block's partial softmax would count them once more.
    """
    if mask.sinks is not None:
        raise ValueError("attention_impl: 'ring' takes no attention sinks (each block would count them)")
    layout = _layout(q, k, mask)
    if layout is None or not layout.context:
        return blockwise_attention(q, k, v, mask, block_q, block_kv)
    ring = _Ring(layout.context, layout.shards, mask._replace(q_positions=None, kv_positions=None,
                 q_segment_ids=None, kv_segment_ids=None), block_q, block_kv)

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks):
        return _ring(ring, q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    return layout.run(local, q, k, v, mask)
