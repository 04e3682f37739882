"""Attention on a device mesh: context parallelism, and kernels XLA cannot partition.

Under a `sharding_context` whose rules shard `activation_length` (the `sequence` mesh axis in the
default rules), every activation of the decoder is split along T and only attention needs the other
shards' tokens. `sharded_attention` runs the kernel per shard with `shard_map`: each device keeps its
queries [B/dp, T/cp, N/tp, H] and all-gathers keys, values, positions and segment ids along T
(their gradients reduce-scatter back), and tells the kernel where its queries start in the row
(`AttentionMask.q_offset`) so causal masking and tile skipping stay exact. Pallas kernels (splash) go
through the same `shard_map` even without context parallelism: a custom call has no SPMD rule.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from models.attention.mask import AttentionMask
from models.sharding import current_sharding, logical_to_mesh_spec

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask], jax.Array]

Q_AXES = ("batch", "activation_length", "activation_heads", None)
KV_AXES = ("batch", "activation_length", "activation_kv_heads", None)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_self_attention(q: jax.Array, k: jax.Array, mask: AttentionMask) -> bool:
    """The training path: queries and keys are the same whole row, in order."""
    return mask.causal and mask.static_offset and mask.q_offset == 0 and q.shape[1] == k.shape[1]


def sharded_attention(kernel: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                      manual: bool = False) -> jax.Array:
    """`kernel(q, k, v, mask)` on the mesh of the enclosing sharding context (if any); see the module
    docstring. `manual`: the kernel must see per-device shards (Pallas), even without context parallelism."""
    ctx = current_sharding()
    if ctx is None:
        return kernel(q, k, v, mask)
    mesh, rules = ctx
    q_spec = logical_to_mesh_spec(Q_AXES, rules, mesh, q.shape)
    kv_spec = logical_to_mesh_spec(KV_AXES, rules, mesh, k.shape)
    context = _axes(q_spec[1]) if _is_self_attention(q, k, mask) and q_spec[1] == kv_spec[1] else ()
    if not context and not manual:
        return kernel(q, k, v, mask)  # XLA partitions it (batch and heads), gathering T if it must
    batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
    # Query head j*G + g reads key/value head j: split heads only where both split alike.
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
    row = context if len(context) > 1 else (context[0] if context else None)
    act_spec, ids_spec = P(batch, row, heads, None), P(batch, row)

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        offset = 0
        if context:
            gather = lambda x: jax.lax.all_gather(x, context, axis=1, tiled=True)  # noqa: E731
            k, v, kv_pos, kv_seg = gather(k), gather(v), gather(kv_pos), gather(kv_seg)
            offset = jax.lax.axis_index(context) * q.shape[1]
        return kernel(q, k, v, mask._replace(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                                             kv_segment_ids=kv_seg, q_offset=offset))

    run = jax.shard_map(local, mesh=mesh, in_specs=(act_spec,) * 3 + (ids_spec,) * 4, out_specs=act_spec,
                        check_vma=False)
    return run(q, k, v, mask.q_positions, mask.kv_positions, mask.q_segment_ids, mask.kv_segment_ids)
