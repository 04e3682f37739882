"""Context parallelism on 8 simulated devices (sequence=4 x fsdp=2): activations split along T, attention
all-gathering keys and values or passing them around a ring; forward and gradients equal the unsharded ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.schema import ConfigError
from configs.sharding_rules import DEFAULT_RULES
from models.attention import (
    AttentionMask,
    blockwise_attention,
    reference_attention,
    ring_attention,
    sharded_attention,
    tokamax_attention,
)
from models.config import get_preset
from models.decoder import Decoder
from models.sharding import create_sharded, make_mesh, sharding_context
from train.step import next_token_loss

MESH = {"sequence": 4, "fsdp": 2}


def packed(b: int, t: int) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids [B, T]: row 0 holds three documents that cross shard boundaries."""
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    for doc, (start, end) in enumerate([(0, 5), (5, 19), (19, t)], start=1):
        seg[0, start:end], pos[0, start:end] = doc, np.arange(end - start)
    return jnp.asarray(pos), jnp.asarray(seg)


CONTEXT_PARALLEL = {  # name: (attention with the mask's tiles, the collective that moves keys and values)
    "all_gather": (functools.partial(sharded_attention, functools.partial(blockwise_attention, block_q=4, block_kv=4)),
                   "all_gather"),
    "ring": (functools.partial(ring_attention, block_q=4, block_kv=4), "collective_permute"),
    # Registered like splash (`manual`: a Pallas kernel sees per-device shards, each with its traced query
    # offset); tokamax's XLA op stands in for its GPU kernels, with the same key ranges.
    "tokamax": (functools.partial(sharded_attention, functools.partial(tokamax_attention, implementation="xla"),
                                  manual=True), "all_gather"),
}


@pytest.mark.parametrize("schedule,window", [("all_gather", 6)] + [
    pytest.param(*case, marks=pytest.mark.slow) for case in [("all_gather", 0), ("ring", 6), ("ring", 0), ("tokamax", 6)]])
def test_context_parallel_attention_equals_the_reference(schedule, window):
    """Each shard's queries start at their offset from the keys they attend to: causal masking and
    tile skipping (tiles of 4 queries x 4 keys) stay exact whether keys and values are all-gathered or
    passed around the ring; gradients flow back to the key/value shards (reduce-scatter, or the ring
    reversed)."""
    mesh = make_mesh(MESH)
    b, t = 2, 32
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32) for _ in range(2))
    pos, seg = packed(b, t)
    mask = AttentionMask(pos, pos, seg, seg, sliding_window=window, causal=True)
    attend, collective = CONTEXT_PARALLEL[schedule]

    def loss(q, k, v, attend):
        return jnp.sum(jnp.sin(attend(q, k, v, mask)))

    want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, reference_attention)
    split = NamedSharding(mesh, P("fsdp", "sequence"))
    with sharding_context(mesh, DEFAULT_RULES):
        run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
        got = run(*(jax.device_put(x, split) for x in (q, k, v)), attend)
        hlo = run.lower(q, k, v, attend).as_text()  # the shard_map's own collectives
    assert collective in hlo and (collective == "all_gather" or "all_gather" not in hlo)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5), got, want)


@pytest.mark.slow
def test_context_parallel_attention_splits_sinks_with_the_heads():
    """gpt-oss's per-head sinks [N] go into the shard_map split like the query heads (tensor=2 here)."""
    mesh = make_mesh({"sequence": 4, "tensor": 2})
    b, t = 1, 32
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, 2, 8)), jnp.float32) for _ in range(2))
    sinks = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    pos, seg = packed(b, t)

    def loss(q, k, v, sinks, attend):
        return jnp.sum(jnp.sin(attend(q, k, v, AttentionMask(pos, pos, seg, seg, causal=True, sinks=sinks))))

    want = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks, reference_attention)
    with sharding_context(mesh, DEFAULT_RULES):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(
            q, k, v, sinks, CONTEXT_PARALLEL["all_gather"][0])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5), got, want)


@pytest.mark.parametrize("mesh_shape,context_parallel", [({"fsdp": -1}, False), (MESH, True)])
def test_only_a_sequence_axis_of_several_devices_splits_the_row(mesh_shape, context_parallel):
    """A one-device `sequence` axis (the default mesh) runs the kernel as it is, with the static query
    offset that lets it skip the tiles above the causal diagonal; a traced offset (a shard_map over one
    device) made the chunked kernel compute every tile."""
    offsets = []

    def spy(q, k, v, mask):
        offsets.append(mask.q_offset)
        return reference_attention(q, k, v, mask)

    b, t = 2, 32
    q, k = jnp.zeros((b, t, 4, 8)), jnp.zeros((b, t, 2, 8))
    pos, seg = packed(b, t)
    mask = AttentionMask(pos, pos, seg, seg, causal=True)
    with sharding_context(make_mesh(mesh_shape), DEFAULT_RULES):
        jax.make_jaxpr(lambda q, k: sharded_attention(spy, q, k, k, mask))(q, k)
    assert isinstance(offsets[0], int) is not context_parallel


def test_ring_is_a_kernel_without_sinks():
    assert get_preset("tiny", attention_impl="ring").attention_impl == "ring"
    with pytest.raises(ConfigError, match="attention_impl"):
        get_preset("tiny", attention_impl="ring", attention_sinks=True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blockwise", "ring"])
def test_context_parallel_decoder_loss_and_gradients_equal_unsharded(impl):
    cfg = get_preset("tiny", vocab_size=256, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, dtype="float32",
                     attention_impl=impl, cross_entropy_chunk=8)
    b, t = 2, 32
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(b, t + 1))
    pos, seg = packed(b, t)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "positions": pos,
             "segment_ids": seg, "loss_mask": jnp.ones((b, t), jnp.float32)}
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731

    def loss_and_grads(model, batch):
        return nnx.value_and_grad(lambda m: next_token_loss(m, batch).total)(model)

    want_loss, want_grads = nnx.jit(loss_and_grads)(make(), batch)
    mesh = make_mesh(MESH)
    model = create_sharded(make, mesh, DEFAULT_RULES)
    sharded_batch = {k: jax.device_put(x, NamedSharding(mesh, P("fsdp", "sequence"))) for k, x in batch.items()}
    graphdef, state = nnx.split(model)
    with sharding_context(mesh, DEFAULT_RULES):
        loss, grads = nnx.jit(loss_and_grads)(model, sharded_batch)
        traced = jax.make_jaxpr(lambda state: next_token_loss(nnx.merge(graphdef, state), batch).total)(state)
    assert "shard_map" in str(traced)  # attention ran per shard, keys and values gathered
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4), grads, want_grads)
