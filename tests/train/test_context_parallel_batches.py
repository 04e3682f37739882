"""Context parallelism in the Trainer (sequence=4 x fsdp=2 simulated devices): batches are placed split
along T over the `sequence` axis, and a train step on them gives the one-device step's loss, gradients
(AdamW's first moment after one step is 0.1 x the gradient) and parameters."""

import jax
import numpy as np
import pytest

from data.pipeline import to_global_batch
from models.sharding import make_mesh, sharding_context
from tests.train.conftest import small_run
from train.step import next_token_loss
from train.trainer import Trainer, TrainTask

B, T = 8, 64


def packed_batch() -> dict[str, np.ndarray]:
    """One micro-batch [1, B, T]: every row packs documents crossing the 16-token shard boundaries, then padding."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 512, size=(B, T + 1), dtype=np.int32)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        bounds = [0, 7 + b, 30 + b, 58 - b]
        for doc, (start, end) in enumerate(zip(bounds, bounds[1:]), start=1):
            seg[b, start:end], pos[b, start:end] = doc, np.arange(end - start)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
             "loss_mask": (seg > 0).astype(np.float32)}
    return {k: v[None] for k, v in batch.items()}


def one_step(run, mesh):
    """The trainer's placement of `packed_batch()` and its state and metrics after one train step."""
    trainer = Trainer(run, TrainTask(model_config=run.model, train_data=iter(()), loss_fn=next_token_loss), mesh=mesh)
    batch = to_global_batch(packed_batch(), trainer.mesh, trainer.batch_sharding.spec)
    with sharding_context(trainer.mesh, trainer.rules):
        state, metrics = trainer.train_step(trainer.initial_state(), batch)
    return batch, state, metrics


@pytest.mark.slow
def test_train_step_on_sequence_sharded_batches_equals_one_device(corpus_dir, tmp_path):
    runs = {name: small_run(corpus_dir, tmp_path / name, model__attention_impl="blockwise", model__dtype="float32")
            for name in ("one", "context")}
    _, want_state, want = one_step(runs["one"], make_mesh({"data": 1}, devices=jax.devices()[:1]))
    batch, state, got = one_step(runs["context"], make_mesh({"sequence": 4, "fsdp": 2}))

    for x in batch.values():  # [micro, B / fsdp, T / sequence] on every device
        assert {s.data.shape for s in x.addressable_shards} == {(1, B // 2, T // 4)}
    assert got["loss"] == pytest.approx(float(want["loss"]), rel=1e-5)
    assert got["grad_norm"] == pytest.approx(float(want["grad_norm"]), rel=1e-4)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4),
                 (state.params, state.opt_state), (want_state.params, want_state.opt_state))
