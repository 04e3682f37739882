"""Scaling-law sweeps and ablations: expand a sweep config into runs, run them, record results.

    python -m train.sweep --config=configs/sweeps/code_isoflop.py              # run locally, one after another
    python -m train.sweep --config=configs/sweeps/code_isoflop.py --mode=commands \
        --launcher="sbatch --nodes=1 launch/slurm.sbatch"                      # one launch command per run
    python -m train.sweep --config=configs/sweeps/code_isoflop.py --mode=collect  # record finished run dirs

A sweep (configs/sweeps/*.py, `SweepConfig`) starts every run from one run config file plus
`--config.<path>=value` overrides, so each run is exactly a `train.pretrain` command. Kinds:

- grid: sizes x token budgets D;
- isoflop: for each compute budget C, every size with D = C / flops_per_token(N) (the model's own
  FLOP formula, models/config.py), kept when its step count lies in [min_steps, max_steps];
- ablation: rows of overrides x seeds at a fixed step count.

Scaling runs use warmup-stable-decay with a fixed decay fraction, so runs of one size, seed and
optimizer setting share their stable phase: locally the longest ("trunk") runs first and every shorter
budget starts from the trunk's checkpoint at the step its own decay begins. The learning rate up to
that step is the same in both schedules, so the branch equals a run from scratch, at a fraction of the
cost. Learning rate and batch size come from a rule: fixed, or a power law in C (DeepSeek LLM's form).

Each finished run appends one record to the results JSONL: N with and without embeddings, D, C (the
model's formula) and 6ND, final and smoothed held-out loss (and per language when the data has several
sources), seed and a hash of the run's config. Re-running the command skips recorded runs and resumes a
killed one from its checkpoint. `python -m analysis.report` fits laws to the results and plots them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from absl import flags
from ml_collections import ConfigDict
from pydantic import Field

from configs.cli import _load_config_file, define_config
from configs.cli import run as run_entry_point
from configs.schema import ConfigError, parse, section
from data import corpus
from data.jsonl import read_jsonl
from train.config import RunConfig, load_run_config
from train.metrics import read_metrics
from train.pretrain import data_iterator, fit_vocab, make_task, prepare_data
from train.trainer import StepInfo, Trainer

_CONFIG = define_config("configs/sweeps/code_isoflop.py")
_MODE = flags.DEFINE_enum("mode", "run", ["run", "commands", "collect"], "run locally, print launch commands, or record finished run dirs")
_LAUNCHER = flags.DEFINE_string("launcher", "", "commands mode: prefix taking '<config file> <overrides>' (default: python -m train.pretrain --config=)")
_ONLY = flags.DEFINE_list("only", [], "run only these run names")

# Config fields that do not change what a run computes: left out of its hash.
_UNHASHED = ("train.output_dir", "train.log_every", "train.eval_every", "checkpoint")


@section
class Rule:
    """A per-run value: `value` (fixed), or `coefficient * C^exponent` with C the run's compute."""

    kind: Literal["fixed", "power_law"] = "fixed"
    value: float = 0.0
    coefficient: float = 0.0
    exponent: float = 0.0

    def __call__(self, compute: float) -> float:
        return self.value if self.kind == "fixed" else self.coefficient * compute**self.exponent


@section
class SweepConfig:
    name: Annotated[str, Field(min_length=1)]
    kind: Literal["grid", "isoflop", "ablation"]
    base_config: str  # the run config file every run starts from
    base_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # nested, like the run config; every run
    output_dir: str  # run directories: <output_dir>/<run name>
    results: str  # the results JSONL
    seeds: tuple[int, ...] = (0,)  # each sets train.seed and data.shuffle_seed
    # grid / isoflop
    sizes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> model.* overrides
    token_budgets: tuple[float, ...] = ()  # grid
    compute_budgets: tuple[float, ...] = ()  # isoflop: FLOPs by the model's formula
    min_steps: Annotated[int, Field(ge=1)] = 1
    max_steps: Annotated[int, Field(ge=1)] = 10**9
    lr: Rule = Rule(value=3e-4)
    batch_tokens: Rule = Rule(value=0.0)  # tokens per step; 0: the base config's batch size
    batch_multiple: Annotated[int, Field(ge=1)] = 1  # rows per step rounded to a multiple of this (the data-parallel size)
    decay_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2  # WSD decay share of each run's steps
    branch: bool = True  # share the stable phase of runs with equal size, seed and optimizer settings
    # ablation
    rows: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # row name -> nested overrides
    baseline: str = ""
    steps: Annotated[int, Field(ge=0)] = 0  # ablation runs' train.steps (0: the base config's)
    # held-out loss: the final eval, and a line through the last `smoothing_evals` evals (the final
    # `smoothing_fraction` of steps) read at the last step
    smoothing_evals: Annotated[int, Field(ge=1)] = 3
    smoothing_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    per_language_eval: bool = True  # also evaluate each data source alone at the end

    def __post_init__(self) -> None:
        if self.kind in ("grid", "isoflop") and not self.sizes:
            raise ConfigError(f"sizes: a {self.kind} sweep needs at least one size")
        if self.kind == "grid" and not self.token_budgets:
            raise ConfigError("token_budgets: a grid sweep needs at least one")
        if self.kind == "isoflop" and not self.compute_budgets:
            raise ConfigError("compute_budgets: an isoflop sweep needs at least one")
        if self.kind == "ablation" and self.baseline not in self.rows:
            raise ConfigError(f"baseline: {self.baseline!r} is not one of rows {sorted(self.rows)}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its name, overrides of the base config, and what it stands for."""

    name: str
    overrides: dict[str, Any]
    labels: dict[str, Any]  # size / budget / row, seed: the record's grouping fields
    branch_from: tuple[str, int] | None = None  # (trunk run name, step) whose checkpoint it starts from


# ---------------------------------------------------------------------------------------- configs
def apply_overrides(cfg: ConfigDict, overrides: Mapping[str, Any]) -> ConfigDict:
    """A copy of `cfg` with each dotted path set; a path the config lacks raises ConfigError."""
    cfg = ConfigDict(cfg.to_dict(), type_safe=False)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = cfg
        for depth, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ConfigDict):
                raise ConfigError(f"override {path!r}: no section {'.'.join(parents[:depth + 1])!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {path!r}: no field {leaf!r}")
        node[leaf] = value
    return cfg


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_ff": 288}} -> {"model.d_ff": 288} (config files nest: ConfigDict keys hold no dots)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve(sweep: SweepConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """The validated run config of base config + sweep overrides + run overrides (dotted paths)."""
    cfg = apply_overrides(_load_config_file(sweep.base_config), {**flatten(sweep.base_overrides), **overrides})
    return load_run_config(cfg)


def config_hash(run: RunConfig) -> str:
    """sha256 (16 hex digits) of what the run computes: its config without paths, logging and checkpointing."""
    config = run.to_dict()
    for path in _UNHASHED:
        section_name, _, field = path.partition(".")
        if field:
            config.get(section_name, {}).pop(field, None)
        else:
            config.pop(section_name, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stable_until(steps: int, warmup: int, decay_fraction: float) -> int:
    """The first step of WSD's decay (train/optimizer.py's rule)."""
    return max(steps - max(int(steps * decay_fraction), 1), warmup)


# ------------------------------------------------------------------------------------------ runs
def expand(sweep: SweepConfig) -> list[RunSpec]:
    """The sweep's runs, trunks before their branches."""
    if sweep.kind == "ablation":
        steps = {"train.steps": sweep.steps} if sweep.steps else {}
        return [RunSpec(f"{row}-s{seed}", {**flatten(overrides), **steps, **_seed(seed)},
                        {"row": row, "seed": seed, "baseline": sweep.baseline})
                for row, overrides in sweep.rows.items() for seed in sweep.seeds]
    base = resolve(sweep, {})
    runs: list[RunSpec] = []
    for size, model_overrides in sweep.sizes.items():
        model = {f"model.{k}": v for k, v in model_overrides.items()}
        fpt = resolve(sweep, model).model.flops_per_token(base.data.seq_len)
        budgets = sweep.token_budgets if sweep.kind == "grid" else sweep.compute_budgets
        for seed in sweep.seeds:
            group = []
            for budget in budgets:
                compute = budget * fpt if sweep.kind == "grid" else budget
                batch = base.data.batch_size
                if sweep.batch_tokens(compute) > 0:
                    rows = sweep.batch_tokens(compute) / base.data.seq_len / sweep.batch_multiple
                    batch = max(1, round(rows)) * sweep.batch_multiple
                steps = round(compute / fpt / (batch * base.data.seq_len))
                if not sweep.min_steps <= steps <= sweep.max_steps:
                    continue
                overrides = {**model, "data.batch_size": batch, "train.steps": steps, "optim.schedule": "wsd",
                             "optim.wsd_decay_fraction": sweep.decay_fraction, "optim.lr": sweep.lr(compute),
                             **_seed(seed)}
                label = "token_budget" if sweep.kind == "grid" else "compute_budget"
                group.append(RunSpec(f"{size}-{label[0].upper()}{budget:.3g}-s{seed}", overrides,
                                     {"size": size, label: budget, "seed": seed}))
            runs += _branched(group, base.optim.warmup_steps, sweep) if sweep.branch else group
    return runs


def _seed(seed: int) -> dict[str, int]:
    return {"train.seed": seed, "data.shuffle_seed": seed}


def _branched(group: list[RunSpec], warmup: int, sweep: SweepConfig) -> list[RunSpec]:
    """Orders runs of one size and seed so each optimizer setting's longest run comes first and the
    others branch from it where their decay begins (when that lies past the warmup)."""
    def setting(run: RunSpec) -> tuple:
        return (run.overrides["optim.lr"], run.overrides["data.batch_size"])

    ordered = []
    for key in dict.fromkeys(map(setting, group)):
        runs = sorted((r for r in group if setting(r) == key), key=lambda r: -r.overrides["train.steps"])
        trunk = runs[0]
        ordered.append(trunk)
        for run in runs[1:]:
            start = _stable_until(run.overrides["train.steps"], warmup, sweep.decay_fraction)
            ordered.append(dataclasses.replace(run, branch_from=(trunk.name, start)) if start > warmup else run)
    return ordered


def launch_command(sweep: SweepConfig, run: RunSpec, launcher: str = "") -> str:
    """The shell command that trains `run` on its own (from scratch: branching is a local saving),
    evaluating every `smoothing_fraction / (smoothing_evals - 1)` of its steps and at the end, so
    `--mode=collect` finds the final and smoothed held-out losses in its metrics."""
    steps = resolve(sweep, run.overrides).train.steps
    every = max(1, round(steps * sweep.smoothing_fraction / max(sweep.smoothing_evals - 1, 1)))
    overrides = {**flatten(sweep.base_overrides), **run.overrides, "train.eval_every": every,
                 "train.output_dir": f"{sweep.output_dir}/{run.name}"}
    args = " ".join(shlex.quote(f"--config.{k}={v}") for k, v in overrides.items())
    prefix = f"{launcher} {shlex.quote(sweep.base_config)}" if launcher else \
        f"python -m train.pretrain --config={shlex.quote(sweep.base_config)}"
    return f"{prefix} {args}"


# --------------------------------------------------------------------------------------- results
def _evals(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out loss) of the run's evals, the latest record per step (resumes append)."""
    path = run_dir / "metrics.jsonl"
    evals = {r["step"]: r["loss"] for r in read_metrics(path) if r.get("split") == "eval"} if path.exists() else {}
    return sorted(evals.items())


def smoothed_loss(evals: list[tuple[int, float]], steps: int, n_evals: int, fraction: float) -> float | None:
    """A least-squares line through the last `n_evals` evals within the final `fraction` of the steps,
    read at the last step (the final eval alone when fewer than two fall there)."""
    window = [(s, loss) for s, loss in evals if s >= steps * (1 - fraction)][-n_evals:]
    if not window:
        return None
    if len(window) < 2:
        return window[-1][1]
    slope, intercept = np.polyfit([s for s, _ in window], [loss for _, loss in window], 1)
    return float(slope * steps + intercept)


def make_record(sweep: SweepConfig, spec: RunSpec, run: RunConfig, run_dir: Path, **extra: Any) -> dict[str, Any]:
    """The results line of a finished run (read from its run directory)."""
    evals = _evals(run_dir)
    if not evals or evals[-1][0] != run.train.steps:
        raise ValueError(f"{run_dir}: no held-out eval at the final step {run.train.steps} (is it finished?)")
    tokens = run.train.steps * run.data.batch_size * run.data.seq_len
    fpt = run.model.flops_per_token(run.data.seq_len)
    n_non_embedding = run.model.param_count(embeddings=False)
    return {
        "sweep": sweep.name, "name": spec.name, "kind": sweep.kind, **spec.labels,
        "config_hash": config_hash(run), "seed": run.train.seed,
        "n_params": run.model.param_count(), "n_params_non_embedding": n_non_embedding,
        "tokens": tokens, "flops_per_token": fpt, "compute": fpt * tokens, "compute_6nd": 6.0 * n_non_embedding * tokens,
        "steps": run.train.steps, "batch_size": run.data.batch_size, "seq_len": run.data.seq_len, "lr": run.optim.lr,
        "eval_loss": evals[-1][1],
        "eval_loss_smoothed": smoothed_loss(evals, run.train.steps, sweep.smoothing_evals, sweep.smoothing_fraction),
        "overrides": spec.overrides, "output_dir": str(run_dir), **extra,
    }


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """name -> record of a results JSONL (the latest line per name); empty when missing."""
    path = Path(path)
    return {line.record["name"]: line.record for line in read_jsonl(path)} if path.exists() else {}


def append_result(path: str | Path, record: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------- local runner
def _eval_steps(run: RunConfig, sweep: SweepConfig) -> set[int]:
    """Steps of the held-out evals: spread over the final `smoothing_fraction` of the steps, the last one included."""
    first = math.ceil(run.train.steps * (1 - sweep.smoothing_fraction))
    return {int(s) for s in np.linspace(first, run.train.steps, sweep.smoothing_evals).round()}


def _copy_branch_point(trunk_dir: Path, branch_dir: Path, step: int) -> None:
    """Seeds `branch_dir` with the trunk's checkpoint at `step` (and its run metadata), once."""
    target = branch_dir / "checkpoints" / str(step)
    if target.exists():
        return
    branch_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(trunk_dir / "run_config.json", branch_dir / "run_config.json")
    shutil.copytree(trunk_dir / "checkpoints" / str(step), target.with_name(f".{step}.tmp"), dirs_exist_ok=True)
    target.with_name(f".{step}.tmp").rename(target)


class LocalRunner:
    """Runs a sweep's runs one after another in this process (one tokenizer, one JAX runtime)."""

    def __init__(self, sweep: SweepConfig):
        self.sweep = sweep
        self.base = resolve(sweep, {})
        if self.base.data.tokenizer_path == f"{corpus.MULTI_OUT_DIR}/tokenizer.model":
            corpus.ensure_multilang_corpus(corpus.MULTI_OUT_DIR, languages=tuple(self.base.data.sources))
        self.tokenizer = prepare_data(self.base.data)

    def run_dir(self, name: str) -> Path:
        return Path(self.sweep.output_dir) / name

    def execute(self, spec: RunSpec, branch_points: dict[int, Path]) -> dict[str, Any]:
        """Trains (or resumes) `spec`, saving and copying the checkpoints its branches start from; returns its record."""
        overrides = {**spec.overrides, "train.output_dir": str(self.run_dir(spec.name)),
                     "checkpoint.allow_changes": "train.steps" if spec.branch_from else ""}
        run = resolve(self.sweep, overrides)
        # Sweeps set model.vocab_size: N and C of every run are known before the tokenizer is loaded.
        run = dataclasses.replace(run, model=fit_vocab(run.model, True, self.tokenizer))
        if spec.branch_from and (self.run_dir(spec.branch_from[0]) / "checkpoints" / str(spec.branch_from[1])).exists():
            _copy_branch_point(self.run_dir(spec.branch_from[0]), self.run_dir(spec.name), spec.branch_from[1])
        trainer = Trainer(run, make_task(run, self.tokenizer))
        eval_steps = _eval_steps(run, self.sweep)
        pending = dict(branch_points)

        def hook(info: StepInfo) -> None:
            if info.step in eval_steps:
                info.trainer.log(info.step, {"loss": info.trainer.evaluate(info.state)}, prefix="eval")
            for step, target in list(pending.items()):
                if step == info.step and step % run.checkpoint.every:
                    info.trainer.checkpointer.save(step, info.state, trainer.task.train_data, force=True)
                elif step < info.step:  # saved by now (by us, or by the checkpoint hook after us)
                    info.trainer.checkpointer.wait()
                    if step in info.trainer.checkpointer.all_steps():
                        _copy_branch_point(self.run_dir(spec.name), target, step)
                    del pending[step]

        trainer.add_hook(hook, every=1)
        began = time.perf_counter()
        result = trainer.run()
        if result.preempted:
            sys.exit(143)
        by_lang = {}
        if self.sweep.per_language_eval and len(run.data.sources) > 1:
            for lang, source in run.data.sources.items():
                data = dataclasses.replace(run.data, sources={lang: source})
                trainer.task.eval_data = lambda data=data: data_iterator(data, self.tokenizer, "validation", fim=False)
                by_lang[lang] = trainer.evaluate(result.state)
        return make_record(self.sweep, spec, run, result.output_dir, loss_by_lang=by_lang,
                           branched_from=spec.branch_from and list(spec.branch_from),
                           wall_s=round(time.perf_counter() - began, 1))


def run_sweep(sweep: SweepConfig, runs: Iterable[RunSpec]) -> None:
    runs = list(runs)
    done = read_results(sweep.results)
    runner = LocalRunner(sweep)
    branches: dict[str, dict[int, Path]] = {}
    for spec in runs:
        if spec.branch_from:
            branches.setdefault(spec.branch_from[0], {})[spec.branch_from[1]] = runner.run_dir(spec.name)
    for i, spec in enumerate(runs, start=1):
        expected = config_hash(resolve(sweep, spec.overrides))
        if spec.name in done:
            if done[spec.name]["config_hash"] != expected:
                raise ConfigError(f"{sweep.results}: run {spec.name} was recorded with another config "
                                  f"(hash {done[spec.name]['config_hash']} != {expected}); use a new output_dir and results")
            print(f"[sweep] {i}/{len(runs)} {spec.name}: recorded, skipped", file=sys.stderr, flush=True)
            continue
        print(f"[sweep] {i}/{len(runs)} {spec.name}" + (f" (from {spec.branch_from[0]} step {spec.branch_from[1]})"
              if spec.branch_from else ""), file=sys.stderr, flush=True)
        record = runner.execute(spec, branches.get(spec.name, {}))
        append_result(sweep.results, record)
        print(f"[sweep] {spec.name}: eval loss {record['eval_loss']:.4f} in {record['wall_s']}s", file=sys.stderr, flush=True)


def collect(sweep: SweepConfig, runs: Iterable[RunSpec]) -> int:
    """Records the runs whose directories hold a finished run and are not yet in the results; returns how many."""
    done, count = read_results(sweep.results), 0
    for spec in runs:
        run_dir = Path(sweep.output_dir) / spec.name
        if spec.name in done or not (run_dir / "metrics.jsonl").exists():
            continue
        run = resolve(sweep, {**spec.overrides, "train.output_dir": str(run_dir)})
        try:
            append_result(sweep.results, make_record(sweep, spec, run, run_dir))
            count += 1
        except ValueError as e:
            print(f"[sweep] {spec.name}: not recorded: {e}", file=sys.stderr)
    return count


def main(sweep: SweepConfig) -> None:
    runs = expand(sweep)
    if _ONLY.value:
        unknown = sorted(set(_ONLY.value) - {r.name for r in runs})
        if unknown:
            raise ConfigError(f"--only: no run(s) {unknown} in sweep {sweep.name}")
        runs = [r for r in runs if r.name in _ONLY.value]
    if _MODE.value == "commands":
        for spec in runs:
            print(launch_command(sweep, spec, _LAUNCHER.value))
    elif _MODE.value == "collect":
        print(f"recorded {collect(sweep, runs)} run(s) in {sweep.results}")
    else:
        run_sweep(sweep, runs)


if __name__ == "__main__":
    run_entry_point(main, _CONFIG, lambda cfg: parse(SweepConfig, cfg.to_dict()))
