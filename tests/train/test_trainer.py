"""The Trainer in-process: sharded equals single-device, non-finite losses stop with the step named,
checkpoints restore onto another mesh, hooks run on their schedule, logged throughput excludes
evaluation, logged losses are window means.

Runs share their step counts where a test does not need its own (STEPS on one device, MESH_STEPS on
the default mesh): the step count is compiled into the learning-rate schedule, so runs with equal
configs reuse one compilation (tests/train/conftest.py keeps a compilation cache)."""

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs.sharding_rules import DEFAULT_RULES
from models.decoder import Decoder
from models.pretrained import load_trained_model
from models.sharding import abstract_with_shardings, make_mesh
from tests.train.conftest import small_run
from train.checkpoint import Checkpointer
from train.optimizer import make_optimizer
from train.pretrain import data_iterator
from train.state import init_train_state
from train.step import next_token_loss
from train.trainer import NonFiniteLossError, Trainer, TrainTask

STEPS = 20  # on one device: enough to see the loss fall
MESH_STEPS = 8  # on the default mesh (fsdp over all devices)


def make_task(run, tokenizer, data=None):
    return TrainTask(
        model_config=run.model,
        train_data=data if data is not None else data_iterator(run.data, tokenizer, "train"),
        loss_fn=next_token_loss,
        eval_data=functools.partial(data_iterator, run.data, tokenizer, "validation"),
    )


def train(run, task, mesh=None, **kwargs):
    return Trainer(run, task, mesh=mesh, **kwargs).run()


def losses(output_dir):
    with open(output_dir / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_sharded_training_matches_one_device(corpus_dir, tokenizer, tmp_path):
    runs = {}
    for name, mesh in [("one", make_mesh({"data": 1}, devices=jax.devices()[:1])),
                       ("fsdp4_tensor2", make_mesh({"fsdp": 4, "tensor": 2}))]:
        run = small_run(corpus_dir, tmp_path / name, train__steps=STEPS, train__eval_every=STEPS,
                        train__eval_batches=2)
        result = train(run, make_task(run, tokenizer), mesh=mesh)
        runs[name] = (losses(tmp_path / name), result.eval_loss)
    (one, eval_one), (sharded, eval_sharded) = runs["one"], runs["fsdp4_tensor2"]
    assert len(one) == STEPS and one[-1] < one[0] - 1.0, one  # it learns
    np.testing.assert_allclose(sharded, one, rtol=2e-4)
    assert eval_sharded == pytest.approx(eval_one, rel=2e-4)


class PoisonAt:
    """Wraps a data iterator; batch number `at` (1-based) gets a NaN in its loss mask."""

    def __init__(self, iterator, at):
        self.iterator, self.at, self.count = iterator, at, 0

    def __next__(self):
        batch = next(self.iterator)
        self.count += 1
        if self.count == self.at:
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, 0] = np.nan
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_non_finite_loss_stops_naming_the_step(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path / "nan", train__steps=MESH_STEPS, train__log_every=4)
    data = PoisonAt(data_iterator(run.data, tokenizer, "train"), at=3)
    with pytest.raises(NonFiniteLossError, match="at step 3 "):
        train(run, make_task(run, tokenizer, data))


def test_non_finite_loss_is_skipped_when_configured(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path / "skip", train__steps=MESH_STEPS, train__on_nonfinite="skip")
    data = PoisonAt(data_iterator(run.data, tokenizer, "train"), at=2)
    result = train(run, make_task(run, tokenizer, data))
    assert int(result.state.nonfinite_steps) == 1 and result.step == MESH_STEPS
    assert all(np.isfinite(jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x).sum(), result.state.params))))


def test_checkpoint_restores_onto_a_differently_shaped_mesh(corpus_dir, tmp_path):
    run = small_run(corpus_dir, tmp_path / "ckpt")
    make_model = lambda: Decoder(run.model, rngs=nnx.Rngs(0))  # noqa: E731
    make_tx = lambda params: make_optimizer(run.optim, 10, params)[0]  # noqa: E731

    _, state, _, _ = init_train_state(make_model, make_tx, make_mesh({"fsdp": 8}), DEFAULT_RULES)
    checkpointer = Checkpointer(tmp_path / "ckpt", run.checkpoint)
    checkpointer.save(1, state, None, force=True)
    checkpointer.wait()

    new_mesh = make_mesh({"fsdp": 2, "tensor": 4})
    _, target, _, shardings = init_train_state(make_model, make_tx, new_mesh, DEFAULT_RULES)
    restored = checkpointer.restore(1, abstract_with_shardings(target, shardings), None)
    q_proj = restored.params["stacks"]["dense"]["blocks"]["attn"]["q_proj"].get_value()
    assert q_proj.sharding.mesh.shape["tensor"] == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)


def test_checkpoints_keep_the_last_k_and_every_mth(corpus_dir, tmp_path):
    run = small_run(corpus_dir, tmp_path, checkpoint__every=1, checkpoint__keep_last=2, checkpoint__keep_every=3)
    _, state, _, _ = init_train_state(lambda: Decoder(run.model, rngs=nnx.Rngs(0)),
                                      lambda p: make_optimizer(run.optim, 10, p)[0],
                                      make_mesh({"data": 1}, devices=jax.devices()[:1]), DEFAULT_RULES)
    checkpointer = Checkpointer(tmp_path / "keep", run.checkpoint)
    for step in range(1, 8):
        assert checkpointer.save(step, state, None)
    checkpointer.wait()
    assert checkpointer.all_steps() == [3, 6, 7]


def test_metrics_are_written_as_jsonl_tensorboard_and_a_png(tmp_path):
    from train.metrics import MetricsLogger, plot_loss_curve, summarize

    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.write(step, summarize({"loss": np.float32(5.0 / step), "moe/load": np.array([1.0, 3.0])}))
    logger.write(5, {"loss": 1.5}, prefix="eval")
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["moe/load"] == 2.0 and records[0]["moe/load/layer_1"] == 3.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_model_loads_from_its_run_directory(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path / "run", train__steps=MESH_STEPS)
    result = train(run, make_task(run, tokenizer))
    trained = nnx.merge(result.graphdef, result.state.params, result.state.rest)
    model, loaded_tokenizer = load_trained_model(tmp_path / "run", mesh=make_mesh({"fsdp": 2, "tensor": 4}))
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16)
    np.testing.assert_allclose(model(tokens).logits, trained(tokens).logits, atol=1e-5)
    assert loaded_tokenizer.encode("def f(x):\n\treturn x") == tokenizer.encode("def f(x):\n\treturn x")


def one_device():
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def test_hooks_run_on_their_schedule_and_can_stop_the_run(corpus_dir, tokenizer, tmp_path):
    run = small_run(corpus_dir, tmp_path / "hooks", train__steps=STEPS)
    trainer = Trainer(run, make_task(run, tokenizer), mesh=one_device())
    seen, at_end = [], []
    trainer.add_hook(lambda info: seen.append(info.step), every=3, at_end=False)
    trainer.add_hook(lambda info: at_end.append(info.step), every=4)
    trainer.add_hook(lambda info: info.step == 9 and info.trainer.request_stop(), every=1)
    result = trainer.run()
    assert seen == [3, 6, 9] and at_end == [4, 8] and result.step == 9
    assert Checkpointer(tmp_path / "hooks" / "checkpoints", run.checkpoint).latest_step() == 9  # saved on stop


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_tokens_per_second_excludes_evaluation_at_any_interval(corpus_dir, tokenizer, tmp_path):
    """Each step costs 1 s and each evaluation 50 s of the fake clock; eval_every=3 is not a multiple
    of log_every=2, the case that inflated tokens/s 2x: every window must report 1 s per step."""
    run = small_run(corpus_dir, tmp_path / "timing", train__steps=STEPS, train__log_every=2, train__eval_every=3,
                    train__eval_batches=1)
    clock = FakeClock()
    task = make_task(run, tokenizer)
    evaluate = task.eval_data

    def slow_eval():
        clock.now += 50.0
        return evaluate()

    class OneSecondPerBatch(PoisonAt):
        def __next__(self):
            clock.now += 1.0
            return next(self.iterator)

    task.eval_data = slow_eval
    task.train_data = OneSecondPerBatch(task.train_data, at=0)
    Trainer(run, task, mesh=one_device(), clock=clock).run()
    records = [json.loads(line) for line in (tmp_path / "timing" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(2, STEPS + 1, 2))
    assert all(r["step_time_s"] == pytest.approx(1.0) for r in train_records), train_records
    assert all(r["tokens_per_sec"] == pytest.approx(8 * 64) for r in train_records)
    assert [r["step"] for r in records if r["split"] == "eval"] == [*range(3, STEPS + 1, 3), STEPS]  # and at the end


def test_logged_loss_is_the_mean_over_the_window(corpus_dir, tokenizer, tmp_path):
    per_step = small_run(corpus_dir, tmp_path / "every", train__steps=STEPS, train__log_every=1)
    windowed = small_run(corpus_dir, tmp_path / "window", train__steps=STEPS, train__log_every=3)
    train(per_step, make_task(per_step, tokenizer), mesh=one_device())
    train(windowed, make_task(windowed, tokenizer), mesh=one_device())
    each, window = losses(tmp_path / "every"), losses(tmp_path / "window")
    # Windows of 3 steps, and the last, shorter one ends with the run.
    np.testing.assert_allclose(window, [np.mean(each[i:i + 3]) for i in range(0, STEPS, 3)], rtol=1e-6)
