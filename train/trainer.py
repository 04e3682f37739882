"""The Trainer that pretraining, SFT and RL share: init or restore, the jitted step, the run, hooks.

    trainer = Trainer(run, task)                  # run: RunConfig; task: model, data, loss
    trainer.add_hook(my_hook, every=100)          # my_hook(info: StepInfo) after every 100th step
    result = trainer.run()

What differs between jobs is the `TrainTask` (the loss, the batch source, the evaluation data) and
the hooks they add. The built-in hooks log metrics (window means, tokens/s and MFU with evaluation
and checkpoint time excluded), evaluate, checkpoint (with the data position), profile, and stop on
preemption (SIGTERM, or orbax's multi-host preemption sync point) after saving.

Resume is safe: the checkpoint's model must match the config (else the error names the field), a
changed optimizer/schedule field is refused unless `checkpoint.allow_changes` names it (and is
logged when it does), shapes are checked before orbax reads anything, and `run_config.json` is
written only after the restore succeeded, so a failed resume leaves the run directory as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs.schema import ConfigError
from data.pipeline import to_global_batch
from models.config import ModelConfig
from models.decoder import Decoder
from models.pretrained import CHECKPOINTS, is_run_dir, read_run_metadata, write_run_metadata
from models.sharding import abstract_with_shardings, logical_to_mesh_spec, sharding_context
from train.checkpoint import Checkpointer
from train.config import RunConfig, is_allowed, trajectory_changes
from train.metrics import MetricsLogger, StepTimer, peak_flops_per_device, print_progress, progress_line, summarize
from train.optimizer import make_optimizer
from train.state import TrainState, init_train_state
from train.step import LossFn, PostUpdateFn, make_eval_step, make_train_step

HostBatch = dict[str, np.ndarray]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf and the config says to stop."""


@dataclasses.dataclass
class TrainTask:
    """What a job trains: model, data and objective. The Trainer supplies everything else."""

    model_config: ModelConfig
    train_data: Iterator[HostBatch]  # host-local batches; get_state()/set_state() make it resumable
    loss_fn: LossFn
    eval_data: Callable[[], Iterator[HostBatch]] | None = None  # a fresh held-out iterator per eval
    post_update: PostUpdateFn | None = None
    init_model: Callable[[], nnx.Module] | None = None  # default: a freshly initialised Decoder
    pretrained: nnx.Module | None = None  # start from these weights instead (its arrays are donated)
    trainable: Any = nnx.Param  # what the optimizer updates (nnx.LoRAParam for LoRA); the rest stays frozen
    # Whether waiting for the next batch counts as step time (input-bound training shows in tokens/s);
    # RL excludes its rollouts, which it reports in a time split of its own.
    count_data_time: bool = True


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step: `step` updates applied, the new state, that step's metrics
    (device arrays: fetching them synchronises) and the trainer."""

    step: int
    state: TrainState
    metrics: dict[str, jax.Array]
    trainer: Trainer


Hook = Callable[[StepInfo], None]


@dataclasses.dataclass
class _Scheduled:
    fn: Hook
    every: int
    at_end: bool
    at_start: bool

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == last)


@dataclasses.dataclass
class TrainResult:
    graphdef: nnx.GraphDef
    state: TrainState
    step: int
    eval_loss: float | None
    preempted: bool
    output_dir: Path
    already_finished: bool  # the run had reached train.steps before this call; nothing was trained


class _PreemptionFlag:
    """Set by SIGTERM; the checkpoint hook saves at the current step and the run stops."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> _PreemptionFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: rely on orbax's multi-host preemption check
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    def __init__(self, run: RunConfig, task: TrainTask, *, mesh: Mesh | None = None, clock: Callable[[], float] | None = None):
        self.config = run
        self.task = task
        self.mesh = mesh or run.mesh.make()
        self.rules = run.mesh.rule_set
        self.output_dir = Path(run.train.output_dir)
        self.timer = StepTimer(clock) if clock else StepTimer()
        self.eval_loss: float | None = None  # the latest
        self.eval_losses: dict[int, float] = {}  # step -> held-out loss, for this invocation
        self._hooks: list[_Scheduled] = []
        self._stop_requested = False
        self.preempted = False
        self.checkpointer = Checkpointer(self.output_dir / CHECKPOINTS, run.checkpoint)
        self._resume_step = self.checkpointer.latest_step() if run.checkpoint.resume else None
        if self._resume_step is not None:
            self._check_resumable()  # before anything is built: a refused resume costs no init or compile

        make_model = task.init_model or (lambda: Decoder(task.model_config, rngs=nnx.Rngs(run.train.seed)))
        schedule: list[Any] = []

        def make_tx(params: Any) -> Any:
            tx, lr = make_optimizer(run.optim, run.train.steps, params)
            schedule.append(lr)
            return tx

        self.graphdef, self._initial_state, tx, self.state_shardings = init_train_state(
            make_model, make_tx, self.mesh, self.rules, trainable=task.trainable, pretrained=task.pretrained
        )
        self.schedule = schedule[0]
        self.n_trainable = sum(x.size for x in jax.tree.leaves(self._initial_state.params))
        self.n_frozen = sum(x.size for x in jax.tree.leaves(nnx.state(self._initial_state.rest, nnx.Param)))

        batch_spec = logical_to_mesh_spec(("batch", "activation_length"), self.rules, self.mesh)
        self.batch_sharding = NamedSharding(self.mesh, P(None, *batch_spec))  # [micro_batches, batch, seq]
        self.eval_sharding = NamedSharding(self.mesh, batch_spec)
        with sharding_context(self.mesh, self.rules):
            self.train_step = jax.jit(
                make_train_step(self.graphdef, tx, task.loss_fn, post_update=task.post_update, trainable=task.trainable,
                                dropout_seed=run.train.seed if _has_dropout(task.model_config) else None),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, None),
                donate_argnums=0,
            )
            self.eval_step = jax.jit(make_eval_step(self.graphdef, task.loss_fn), in_shardings=(self.state_shardings, self.eval_sharding))

        train = run.train
        self.add_hook(self._log_metrics, every=1)
        if train.eval_every and task.eval_data is not None and train.eval_batches:
            self.add_hook(self._evaluate_hook, every=train.eval_every)
        if train.profile_num_steps:
            self.add_hook(self._profile_hook, every=1, at_end=False)
        self.add_hook(self._checkpoint_hook, every=1)

    # ---- hooks -------------------------------------------------------------------------------------

    def add_hook(self, fn: Hook, *, every: int = 1, at_end: bool = True, at_start: bool = False) -> None:
        """Runs `fn(info)` after every `every`-th step (and after the last one when `at_end`; and once
        before the first step of a fresh run, with empty metrics, when `at_start`: a baseline).
        Hooks run in the order added; the built-in checkpoint hook is always last."""
        scheduled = _Scheduled(fn, every, at_end, at_start)
        if self._hooks and self._hooks[-1].fn == self._checkpoint_hook:
            self._hooks.insert(len(self._hooks) - 1, scheduled)
        else:
            self._hooks.append(scheduled)

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """Writes `values` to the run's metrics (JSONL and TensorBoard); for hooks."""
        self._logger.write(step, values, prefix=prefix)

    def request_stop(self) -> None:
        """Ends the run after the current step's hooks (the checkpoint hook saves first)."""
        self._stop_requested = True

    # ---- state -------------------------------------------------------------------------------------

    def initial_state(self) -> TrainState:
        """A fresh state, or the latest checkpoint's when resuming (see the module docstring)."""
        if self._resume_step is None:
            state = self._initial_state
        else:
            target = abstract_with_shardings(self._initial_state, self.state_shardings)
            state = self.checkpointer.restore(self._resume_step, target, self.task.train_data)
            print_progress(f"resumed from {self.checkpointer.directory}/{self._resume_step} (step {int(state.step)})")
        self._initial_state = None  # donated to the first step; do not keep a second copy alive
        write_run_metadata(self.output_dir, self.task.model_config, self.config.to_dict(), self.config.data.tokenizer_path)
        return state

    def _check_resumable(self) -> None:
        if not is_run_dir(self.output_dir):
            return
        saved = read_run_metadata(self.output_dir)
        current_model = json.loads(json.dumps(self.task.model_config.to_dict()))  # as saved: tuples are lists
        for name, value in saved.get("model", {}).items():
            if current_model.get(name) != value:
                raise ConfigError(
                    f"model.{name}: the checkpoints in {self.checkpointer.directory} were trained with {value!r}, this "
                    f"config has {current_model.get(name)!r}; a resumed run keeps its model (use a new train.output_dir)"
                )
        allowed = self.config.checkpoint.allowed_changes
        changes = trajectory_changes(saved.get("config", {}), self.config.to_dict(), self.config.trajectory_fields)
        for path, old, new in changes:
            if not is_allowed(path, allowed):
                raise ConfigError(
                    f"{path}: the run in {self.output_dir} was trained with {old!r}, this config has {new!r}; resuming "
                    f"would change its optimizer trajectory. Set checkpoint.allow_changes={path!r} to accept it"
                )
            logging.warning("resume changes %s: %r -> %r (allowed by checkpoint.allow_changes)", path, old, new)
            print_progress(f"resume: {path} changed from {old!r} to {new!r} (allowed)")

    # ---- the run -----------------------------------------------------------------------------------

    def _global_batch(self, host_batch: HostBatch, sharding: NamedSharding) -> dict[str, jax.Array]:
        return to_global_batch(host_batch, self.mesh, sharding.spec)

    def add_eval_at_start(self) -> None:
        """Also evaluates before the first step of a fresh run (the starting point of a fine-tune)."""
        for hook in self._hooks:
            if hook.fn == self._evaluate_hook:
                hook.at_start = True

    def evaluate(self, state: TrainState) -> float | None:
        """Mean held-out loss per token over `train.eval_batches` batches (None without eval data)."""
        if self.task.eval_data is None or not self.config.train.eval_batches:
            return None
        loss_sum, weight = 0.0, 0.0
        for i, batch in enumerate(self.task.eval_data()):
            if i == self.config.train.eval_batches:
                break
            with sharding_context(self.mesh, self.rules):
                out = self.eval_step(state, self._global_batch(batch, self.eval_sharding))
            loss_sum += float(out["loss_sum"])
            weight += float(out["weight"])
        return loss_sum / max(weight, 1.0)

    def run(self) -> TrainResult:
        """Trains from the initial (or restored) state to `train.steps`, running the hooks."""
        state = self.initial_state()
        start = int(state.step)
        total, accum = self.config.train.steps, self.config.train.grad_accum
        size = f"{self.n_trainable / 1e6:.2f}M parameters"
        if self.n_frozen:
            size = f"{self.n_trainable / 1e6:.2f}M trainable parameters (+{self.n_frozen / 1e6:.2f}M frozen)"
        print_progress(f"model {self.task.model_config.name}: {size}, mesh {dict(self.mesh.shape)}")
        self._logger = MetricsLogger(self.output_dir)
        self._start_step, self._window, self._window_tokens = start, [], 0
        step = start
        if start == 0:
            for hook in self._hooks:
                if hook.at_start:
                    hook.fn(StepInfo(0, state, {}, self))
        self.timer.start()
        with _PreemptionFlag() as preemption:
            self._preemption = preemption
            while step < total and not self._stop_requested:
                with contextlib.nullcontext() if self.task.count_data_time else self.timer.paused(state):
                    batch = next(self.task.train_data)
                host = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}
                # Tokens of the rows actually run (RL's packed row counts vary); every process holds its own rows.
                self._window_tokens += int(np.prod(batch["inputs"].shape)) * jax.process_count()
                with sharding_context(self.mesh, self.rules):
                    state, metrics = self.train_step(state, self._global_batch(host, self.batch_sharding))
                step += 1
                self.timer.step()
                info = StepInfo(step, state, metrics, self)
                for hook in self._hooks:
                    if hook.due(step, total):
                        hook.fn(info)
        self.checkpointer.wait()
        self.checkpointer.close()
        self._logger.close()
        return TrainResult(self.graphdef, state, step, self.eval_loss, self.preempted, self.output_dir,
                           already_finished=start >= total)

    # ---- built-in hooks ----------------------------------------------------------------------------

    def _log_metrics(self, info: StepInfo) -> None:
        """Collects every step's metrics; every `train.log_every` steps (and at the end) writes their
        window means with tokens/s, MFU and the learning rate, and enforces `train.on_nonfinite`."""
        self._window.append(info.metrics)
        train = self.config.train
        if info.step % train.log_every and info.step != train.steps:
            return
        window = jax.device_get(self._window)
        tokens = self._window_tokens / len(window)  # per step
        self._window, self._window_tokens = [], 0
        flat = [summarize(m) for m in window]  # once per step, not once per (step, metric)
        values = {k: float(np.mean([f[k] for f in flat])) for k in flat[-1]}
        first_bad = int(info.state.first_nonfinite_step)
        if first_bad >= 0 and train.on_nonfinite == "stop":
            self.checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {first_bad + 1} (the update was not applied); set "
                f"train.on_nonfinite=skip to skip such steps, or resume from the checkpoint in "
                f"{self.checkpointer.directory} with a lower optim.lr"
            )
        step_time = self.timer.lap()
        values.update(
            lr=float(self.schedule(info.step - 1)),
            step_time_s=step_time,
            tokens_per_sec=tokens / step_time,
            tokens_per_sec_per_device=tokens / step_time / jax.device_count(),
            skipped_nonfinite=int(info.state.nonfinite_steps),
        )
        peak = peak_flops_per_device(train.peak_tflops_per_device)
        if peak:
            flops = self.task.model_config.flops_per_token(self.config.data.seq_len) * tokens
            values["mfu"] = flops / step_time / (peak * jax.device_count())
        self._logger.write(info.step, values)
        print_progress(progress_line(info.step, train.steps, values, self.timer.elapsed(), info.step - self._start_step))

    def _evaluate_hook(self, info: StepInfo) -> None:
        with self.timer.paused(info.state):
            self.eval_loss = self.evaluate(info.state)
        if self.eval_loss is not None:
            self.eval_losses[info.step] = self.eval_loss
            self._logger.write(info.step, {"loss": self.eval_loss}, prefix="eval")
            print_progress(f"step {info.step}: eval loss {self.eval_loss:.4f}")

    def _profile_hook(self, info: StepInfo) -> None:
        start, n = self.config.train.profile_start_step, self.config.train.profile_num_steps
        if info.step == start:
            jax.profiler.start_trace(str(self.output_dir / "profile"))
        elif info.step == start + n:
            jax.block_until_ready(info.state)
            jax.profiler.stop_trace()

    def _checkpoint_hook(self, info: StepInfo) -> None:
        preempted = self._preemption.raised or (jax.process_count() > 1 and self.checkpointer.reached_preemption(info.step))
        with self.timer.paused(None):
            final = preempted or self._stop_requested or info.step == self.config.train.steps
            self.checkpointer.save(info.step, info.state, self.task.train_data, force=final)
        if preempted:
            self.preempted = True
            print_progress(f"preempted: checkpoint saved at step {info.step}")
            self.request_stop()


def _has_dropout(model_cfg: ModelConfig) -> bool:
    """Whether the model has dropout to run in training mode (LoRA adapter dropout)."""
    return model_cfg.lora is not None and model_cfg.lora.dropout > 0
