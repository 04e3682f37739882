"""The whole lifecycle on the embedded default, in one command: raw code to an RL-improved, evaluated
model, with a report.

    make lifecycle        # = python -m lifecycle.run --config=configs/lifecycle/default.py

Stages (`lifecycle.stages`), each one command of codelm's own, run from the repository root:

    corpus -> problems -> curate -> pretrain -> eval-pretrain -> sft -> eval-sft -> rl -> eval-rl -> report

Finished stages are recorded in `<root>/lifecycle.json` and skipped when the command runs again; an
interrupted training stage resumes from its last checkpoint (the stage's own resume), any other stage
starts over. One execution service is started for the stages that run programs (or `sandbox.url` is
used) and stopped at the end. Every stage's output is teed to `<root>/logs/<stage>.log`, with a
progress line per stage here. SIGTERM/SIGINT stop the running stage the way its command handles
them (training stages checkpoint) and exit 143/130; run the command again to go on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from configs import cli
from configs.lifecycle.layout import Layout
from configs.schema import ConfigError, parse, section
from lifecycle.stages import SANDBOX_URL, Stage, lifecycle_stages
from sandbox.local import LocalSandbox
from train.metrics import format_duration

_CONFIG = cli.define_config("configs/lifecycle/default.py")

PositiveInt = Annotated[int, Field(ge=1)]


@section
class ProblemsSection:
    train: PositiveInt = 2000
    heldout: PositiveInt = 100


@section
class CurationSection:
    workers: Annotated[int, Field(ge=0)] = 2
    overrides: tuple[str, ...] = ()


@section
class StageSection:
    config: Annotated[str, Field(min_length=1)]
    overrides: tuple[str, ...] = ()


@section
class EvalSection:
    num_samples: PositiveInt = 20
    ks: str = "1,10"
    temperature: Annotated[float, Field(ge=0.0)] = 0.8
    max_new_tokens: PositiveInt = 96
    batch_size: PositiveInt = 16

    def __post_init__(self) -> None:
        try:
            ks = [int(k) for k in self.ks.split(",") if k.strip()]
        except ValueError:
            raise ConfigError(f"eval.ks: expected comma-separated integers, got {self.ks!r}") from None
        if not ks or min(ks) < 1 or max(ks) > self.num_samples:
            raise ConfigError(f"eval.ks: each k must be in [1, eval.num_samples={self.num_samples}], got {self.ks!r}")


@section
class SandboxSection:
    url: str = ""
    workers: PositiveInt = 2


@section
class LifecycleConfig:
    pretrain: StageSection
    sft: StageSection
    rl: StageSection
    root: Annotated[str, Field(min_length=1)] = "runs/lifecycle"
    python: str = ""
    problems: ProblemsSection = ProblemsSection()
    curation: CurationSection = CurationSection()
    eval: EvalSection = EvalSection()
    sandbox: SandboxSection = SandboxSection()
    peak_tflops: Annotated[float, Field(ge=0.0)] = 0.0

    @property
    def layout(self) -> Layout:
        return Layout(self.root)


def load_config(cfg: Any) -> LifecycleConfig:
    config = parse(LifecycleConfig, cfg.to_dict())
    for stage in ("pretrain", "sft", "rl"):
        path = getattr(config, stage).config.partition(":")[0]
        if not os.path.isfile(path):
            raise ConfigError(f"{stage}.config: no such file {path!r}")
    return config


# ---- state ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LifecycleState:
    """`<root>/lifecycle.json`: the measured peak and, per finished stage, its command and wall time."""

    path: Path
    peak_tflops: float = 0.0
    stages: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    invocation: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last run's command and config

    @classmethod
    def load(cls, root: str | Path) -> LifecycleState:
        path = Path(Layout(str(root)).state)
        if not path.is_file():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            return cls(path, float(raw.get("peak_tflops", 0.0)), dict(raw["stages"]), dict(raw.get("invocation", {})))
        except (ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"{path}: unreadable lifecycle state ({e}); move it aside to start over") from None

    def is_done(self, name: str) -> bool:
        return self.stages.get(name, {}).get("status") == "done"

    def record(self, name: str, command: str, seconds: float) -> None:
        self.stages[name] = {"status": "done", "command": command, "seconds": round(seconds, 1),
                             "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"peak_tflops": self.peak_tflops, "stages": self.stages, "invocation": self.invocation},
                                  indent=2) + "\n")
        os.replace(tmp, self.path)


def measure_peak_tflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul TFLOP/s of one device (best of `repeats`): the peak MFU is quoted against."""
    import jax  # noqa: PLC0415  (only when no peak is configured)
    import jax.numpy as jnp  # noqa: PLC0415

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


# ---- running -------------------------------------------------------------------------------------------


class StageFailed(RuntimeError):
    pass


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def progress(message: str) -> None:
    print(f"[lifecycle] {message}", file=sys.stderr, flush=True)


class StageProcesses:
    """Runs stage commands one at a time, each in its own process group, teeing its output to stderr and a
    log. While one runs, SIGTERM/SIGINT (a terminal's Ctrl-C too) go to it as SIGTERM, so a training stage
    checkpoints and exits; then `run` raises `Interrupted`. Between stages they raise at once."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StageProcesses:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        else:
            raise Interrupted(signum)

    def run(self, argv: Sequence[str], log_path: Path) -> int:
        """`argv`'s exit code, from the repository root; raises Interrupted if a signal stopped it."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         errors="replace", start_new_session=True, cwd=_repo_root())
            try:
                assert self.proc.stdout is not None
                for line in self.proc.stdout:
                    sys.stderr.write(line)
                    log.write(line)
                    log.flush()
                code = self.proc.wait()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                self.proc = None
        if self.signum is not None:
            raise Interrupted(self.signum)
        return code


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def display_command(argv: Sequence[str]) -> str:
    """The command as a user would type it in the repository root (the interpreter path made relative)."""
    program = argv[0]
    if os.path.isabs(program) and os.path.commonpath([program, _repo_root()]) == _repo_root():
        program = os.path.relpath(program, _repo_root())
    return shlex.join([program, *argv[1:]])


class ServiceOnDemand:
    """The execution service's URL, starting a private service the first time a stage needs one."""

    def __init__(self, url: str, workers: int):
        self.url, self.workers = url, workers
        self._service: LocalSandbox | None = None

    def get(self) -> str:
        if not self.url:
            progress(f"starting the execution service ({self.workers} workers)")
            self._service = LocalSandbox(workers=self.workers).start()
            self.url = self._service.url
        return self.url

    def close(self) -> None:
        if self._service is not None:
            progress("stopping the execution service")
            self._service.stop()


def run_stages(stages: Sequence[Stage], state: LifecycleState, service: ServiceOnDemand, logs: Path) -> None:
    """Runs the stages not yet done, in order; raises StageFailed or Interrupted."""
    started = time.monotonic()
    with StageProcesses() as processes:
        for index, stage in enumerate(stages, 1):
            label = f"stage {index}/{len(stages)} {stage.name}"
            if state.is_done(stage.name) and not stage.always:
                progress(f"{label}: done before ({format_duration(state.stages[stage.name]['seconds'])}), skipped")
                continue
            argv = [arg.replace(SANDBOX_URL, service.get()) if SANDBOX_URL in arg else arg for arg in stage.argv]
            progress(f"{label}: {stage.title} ... (total {format_duration(time.monotonic() - started)})")
            stage_start = time.monotonic()
            if stage.before is not None:
                stage.before()
            code = processes.run(argv, logs / f"{stage.name}.log")
            if code != 0:
                raise StageFailed(f"{stage.name} failed (exit {code}): {shlex.join(argv)}; its output is in "
                                  f"{logs / (stage.name + '.log')}")
            if stage.after is not None:
                stage.after()
            seconds = time.monotonic() - stage_start
            state.record(stage.name, display_command(argv), seconds)
            progress(f"{label}: done in {format_duration(seconds)} (total {format_duration(time.monotonic() - started)})")


def main(config: LifecycleConfig) -> None:
    layout = config.layout
    state = LifecycleState.load(layout.root)
    state.invocation = {"command": display_command(["python", "-m", "lifecycle.run", *sys.argv[1:]]),
                        "config": dataclasses.asdict(config)}
    if not state.peak_tflops:
        state.peak_tflops = config.peak_tflops or measure_peak_tflops()
        progress(f"fp32 matmul peak for MFU: {state.peak_tflops * 1e3:.0f} GFLOP/s per device")
    state.save()
    stages = lifecycle_stages(config, state.peak_tflops, python=config.python or sys.executable)
    service = ServiceOnDemand(config.sandbox.url, config.sandbox.workers)
    try:
        run_stages(stages, state, service, Path(layout.root) / "logs")
    except StageFailed as e:
        sys.exit(f"[lifecycle] {e}")
    except Interrupted as e:
        progress(f"interrupted ({e}); run the same command again to resume")
        sys.exit(128 + e.signum)
    finally:
        service.close()
    progress(f"report: {layout.report}/report.html (and report.md)")


if __name__ == "__main__":
    cli.run(main, _CONFIG, load_config)
