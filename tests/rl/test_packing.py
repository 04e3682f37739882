"""Sequence packing of RL rows: `rl.rollouts.pack_rows` places every sequence once, in its own mini-batch's
rows, with restarting positions and numbered segments; the policy loss and its gradient on packed rows
equal those on one-sequence-per-row rows for every aggregation mode and both ratio levels (the model sees
each packed sequence alone, through segment ids)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import get_preset
from models.decoder import Decoder
from rl import algorithms as alg
from rl.rollouts import pack_rows, packed_row_count
from rl.train import RLSection, policy_loss

WIDTH = 32


def unpacked_rows(rng: np.random.Generator, n: int, vocab: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """n one-sequence rows [n, WIDTH] of random lengths: a prompt, then response tokens that train."""
    lengths = [int(x) for x in rng.integers(4, WIDTH // 2 + 4, n)]
    f = {k: np.zeros((n, WIDTH), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    f.update({k: np.zeros((n, WIDTH), np.float32) for k in ("loss_mask", "advantages", "old_logp")})
    for i, length in enumerate(lengths):
        f["inputs"][i, :length] = rng.integers(1, vocab, length)
        f["targets"][i, :length] = rng.integers(1, vocab, length)
        f["positions"][i, :length] = np.arange(length)
        f["segment_ids"][i, :length] = 1
        prompt = int(rng.integers(1, length - 1))
        f["loss_mask"][i, prompt:length] = 1.0
        f["advantages"][i, prompt:length] = rng.normal()
        f["old_logp"][i, :length] = -rng.uniform(4.0, 9.0, length)  # ratios far from 1: clipping on both sides
    return f, lengths


def test_pack_rows_places_each_sequence_once_within_its_mini_batch():
    rng = np.random.default_rng(0)
    fields, lengths = unpacked_rows(rng, 16, 50)
    packed = pack_rows(fields, lengths, parts=2, max_per_row=3)
    rows = packed["inputs"].shape[0] // 2
    assert packed["inputs"].shape[0] % 2 == 0 and rows < 8  # fewer rows than sequences per part
    found = []
    for row in range(packed["inputs"].shape[0]):
        segments = packed["segment_ids"][row]
        count = int(segments.max())
        assert 1 <= count <= 3 or count == 0
        for segment in range(1, count + 1):
            where = np.flatnonzero(segments == segment)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(packed["positions"][row, where], np.arange(len(where)))
            matches = [i for i in range(16) if lengths[i] == len(where)
                       and np.array_equal(fields["inputs"][i, :len(where)], packed["inputs"][row, where])]
            assert len(matches) == 1
            i = matches[0]
            assert i // 8 == row // rows  # stays in its mini-batch
            for key in ("targets", "loss_mask", "advantages", "old_logp"):
                np.testing.assert_array_equal(packed[key][row, where], fields[key][i, :lengths[i]])
            found.append(i)
    assert sorted(found) == list(range(16))


@pytest.mark.parametrize("needed, rows, quantum, expected", [
    (5, 64, 1, 16), (17, 64, 1, 32), (64, 64, 1, 64), (3, 8, 8, 8), (3, 10, 1, 4), (5, 40, 4, 12)])
def test_packed_row_counts_come_in_few_buckets(needed, rows, quantum, expected):
    assert packed_row_count(needed, rows, quantum) == expected


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_aggregation_and_ratio_equal_one_sequence_per_row(level):
    """The device-side maths on the same per-token values, laid out packed or one sequence per row: equal
    aggregated losses, weights and gradients with respect to the log-probs, for every aggregation."""
    rng = np.random.default_rng(2)
    fields, lengths = unpacked_rows(rng, 8, 50)
    fields["logp"] = fields["old_logp"] + rng.normal(0.0, 0.3, fields["old_logp"].shape).astype(np.float32)
    packed = pack_rows(fields, lengths, parts=1, max_per_row=4)
    assert packed["inputs"].shape[0] < 8

    def objective(logp, batch, packing, mode):
        out = alg.ppo_clip(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"], clip_low=0.2,
                           clip_high=0.28, level=level, packing=packing)
        total, weight = alg.aggregate(out.loss, batch["loss_mask"], mode, horizon=WIDTH, packing=packing)
        return total / weight, weight

    for mode in alg.AGGREGATIONS:
        results = []
        for batch, packing in ((fields, None), (packed, alg.Packing(jnp.asarray(packed["segment_ids"]), 4))):
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            (value, weight), grad = jax.value_and_grad(objective, has_aux=True)(batch["logp"], batch, packing, mode)
            results.append((value, weight, grad))
        (v1, w1, g1), (v2, w2, g2) = results
        np.testing.assert_allclose(v2, v1, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(w2, w1, err_msg=mode)
        repacked = pack_rows({**fields, "grad": np.asarray(g1)}, lengths, parts=1, max_per_row=4)["grad"]
        np.testing.assert_allclose(g2, repacked, rtol=1e-6, atol=1e-8, err_msg=mode)


@pytest.mark.slow  # ~40 s: 16 eager value-and-grads of a real decoder
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_and_gradient_are_the_same_packed(level):
    cfg = get_preset("tiny",vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                     max_seq_len=WIDTH)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    fields, lengths = unpacked_rows(np.random.default_rng(1), 8, cfg.vocab_size)
    packed = pack_rows(fields, lengths, parts=1, max_per_row=4)
    assert packed["inputs"].shape[0] < 8
    for mode in alg.AGGREGATIONS:
        values = []
        for batch, per_row in ((fields, 1), (packed, 4)):
            rl = RLSection(init_from="-", aggregation=mode, ratio=level, sequences_per_row=per_row,
                           max_response_len=WIDTH, entropy_coef=0.01, temperature=0.9)

            def loss(m, batch=batch, rl=rl):
                out = policy_loss(m, {k: jnp.asarray(v) for k, v in batch.items()}, rl=rl)
                return out.total / out.weight, out

            (value, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
            values.append((value, out.weight, out.metrics["clip_frac"], jax.tree.leaves(grads)))
        (v1, w1, c1, g1), (v2, w2, c2, g2) = values
        np.testing.assert_allclose(v2, v1, rtol=2e-5, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(w2, w1, err_msg=mode)
        np.testing.assert_allclose(c2, c1, atol=1e-6, err_msg=mode)
        assert 0 < c1 < 1
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=mode)
