"""The shared train step: gradient accumulation, loss masking, the non-finite guard, the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from configs.sharding_rules import DEFAULT_RULES
from models.config import get_preset
from models.decoder import Decoder
from models.sharding import make_mesh
from train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from train.state import init_train_state
from train.step import LossOutput, make_train_step, next_token_loss

CFG = get_preset("tiny", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def make_batch(rng, b=8, t=12):
    tokens = rng.integers(0, 97, size=(b, t + 1))
    # Uneven masks: micro-batches carry different token counts, so a mean of means would be wrong.
    mask = (rng.random((b, t)) < np.linspace(0.2, 1.0, b)[:, None]).astype(np.float32)
    return {
        "inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "segment_ids": np.ones((b, t), np.int32),
        "loss_mask": mask,
    }


def fresh_state(optim=None):
    optim = optim or base.get_config().optim
    tx_holder = {}

    def make_tx(params):
        tx_holder["tx"], _ = make_optimizer(optim, 100, params)
        return tx_holder["tx"]

    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, tx, _ = init_train_state(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), make_tx, mesh, DEFAULT_RULES)
    return graphdef, state, tx


def test_accumulating_micro_batches_equals_one_large_batch():
    graphdef, state, tx = fresh_state()
    step = jax.jit(make_train_step(graphdef, tx, next_token_loss))
    batch = make_batch(np.random.default_rng(0))
    one = {k: v[None] for k, v in batch.items()}
    four = {k: v.reshape(4, 2, *v.shape[1:]) for k, v in batch.items()}
    state_one, metrics_one = step(state, one)
    state_four, metrics_four = step(state, four)
    np.testing.assert_allclose(metrics_one["loss"], metrics_four["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_one["grad_norm"], metrics_four["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state_one.params, state_four.params)


def test_loss_mask_excludes_positions():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, make_batch(np.random.default_rng(1)))
    out = next_token_loss(model, batch)
    assert float(out.weight) == pytest.approx(float(batch["loss_mask"].sum()))
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"]).logits
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    np.testing.assert_allclose(out.total, jnp.sum(xent * batch["loss_mask"]), rtol=1e-5)


def test_non_finite_loss_skips_the_update_and_records_the_step():
    graphdef, state, tx = fresh_state()

    def poisoned(model, batch):
        out = next_token_loss(model, batch)
        return LossOutput(out.total * batch["loss_mask"][0, 0], out.weight, out.metrics)

    step = jax.jit(make_train_step(graphdef, tx, poisoned))
    batch = {k: v[None] for k, v in make_batch(np.random.default_rng(2)).items()}
    batch["loss_mask"][0, 0, 0] = 1.0
    state, _ = step(state, batch)
    before = jax.tree.map(np.asarray, state.params)
    batch["loss_mask"][0, 0, 0] = np.nan
    state, metrics = step(state, batch)
    assert not np.isfinite(metrics["loss"])
    assert int(state.step) == 2 and int(state.nonfinite_steps) == 1 and int(state.first_nonfinite_step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)


def test_weight_decay_mask_spares_norms_biases_and_embeddings():
    model = Decoder(CFG.replace(qkv_bias=True, tie_embeddings=False), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    mask = {"/".join(map(str, p)): bool(v.get_value()) for p, v in nnx.to_flat_state(weight_decay_mask(params, base.get_config().optim))}
    assert mask["stacks/dense/blocks/attn/q_proj"] and mask["lm_head"] and mask["stacks/dense/blocks/ffn/mlp/down_proj"]
    assert not mask["embed"] and not mask["final_norm/scale"] and not mask["stacks/dense/blocks/attn/q_bias"]
    assert not mask["stacks/dense/blocks/attn_norm/scale"]


def test_schedules():
    optim = base.get_config().optim
    with optim.unlocked():
        optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cosine = learning_rate_schedule(optim, 100)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0) and float(cosine(100)) == pytest.approx(0.1)
    optim.schedule = "wsd"
    wsd = learning_rate_schedule(optim, 100)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.55) and float(wsd(100)) == pytest.approx(0.1)


def test_moe_step_adds_aux_losses_and_updates_router_biases():
    from models.moe import RouterBias, apply_bias_updates

    cfg = CFG.replace(moe={"num_experts": 4, "experts_per_token": 2, "expert_d_ff": 32, "first_dense_layers": 1,
                           "bias_update_rate": 0.01})
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphdef, state, tx, _ = init_train_state(lambda: Decoder(cfg, rngs=nnx.Rngs(0)),
                                              lambda p: make_optimizer(base.get_config().optim, 100, p)[0],
                                              mesh, DEFAULT_RULES)
    step = jax.jit(make_train_step(graphdef, tx, next_token_loss, post_update=apply_bias_updates))
    batch = {k: v[None] for k, v in make_batch(np.random.default_rng(3)).items()}
    new_state, metrics = step(state, batch)
    assert float(metrics["aux_loss"]) > 0 and float(metrics["loss"]) > float(metrics["xent"])
    assert metrics["moe/expert_load"].shape == (1, 4)  # one MoE layer, four experts
    biases = [v for v in jax.tree.leaves(new_state.rest, is_leaf=lambda x: isinstance(x, RouterBias))]
    assert biases and any(np.abs(np.asarray(b.get_value())).max() > 0 for b in biases)
