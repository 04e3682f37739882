"""The lifecycle report: one static HTML page with PNGs, and the same as Markdown.

    python -m lifecycle.report --root=runs/lifecycle      # the last stage of `make lifecycle`
    python -m lifecycle.report --root=runs/lifecycle --export=results/lifecycle   # keep the run's record

Reads what the stages wrote under the root (configs/lifecycle/layout.py) and writes `<root>/report/`:
report.html, report.md, and the PNGs both show: pass@k per checkpoint (bar chart), pretraining and
SFT loss curves, the RL reward curve, the curation funnel. Tables: data per curation stage, pass@k
per checkpoint (with the standard error over problems), throughput and MFU per stage, and the
exact command and config of every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs.lifecycle.layout import Layout  # noqa: E402
from evals.passk import paired_change  # noqa: E402
from lifecycle.stages import TRAINED  # noqa: E402
from train.metrics import format_duration, read_metrics  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
CURATION_STAGES = ("read", "language", "quality", "decontam", "exact_dedup", "near_dedup", "pii")


# ---- gathering ------------------------------------------------------------------------------------------


def _json(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def train_throughput(run_dir: str | Path) -> dict[str, Any]:
    """Median tokens/s (per device) and MFU of a training run's logged windows, the first (compilation) left out."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [r for r in read_metrics(path) if r.get("split") == "train" and "tokens_per_sec" in r] if path.is_file() else []
    steady = records[1:] or records
    return {"steps": max((r["step"] for r in records), default=0),
            "tokens_per_sec_per_device": _median([r["tokens_per_sec_per_device"] for r in steady]),
            "mfu": _median([r["mfu"] for r in steady if "mfu" in r])}


@dataclasses.dataclass
class PassAtK:
    stage: str
    values: dict[str, float]  # "pass@1" -> value
    per_problem: dict[str, dict[str, float]]  # "pass@1" -> task id -> the problem's value
    num_problems: int
    samples_per_problem: int
    solved: int

    @property
    def stderr(self) -> dict[str, float]:
        """The standard error of each value over problems."""
        return {key: statistics.stdev(scores.values()) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0
                for key, scores in self.per_problem.items()}


def pass_at_k_of(stage: str, results: dict[str, Any]) -> PassAtK:
    keys = [k for k in results if k.startswith("pass@")]
    per_problem = {key: {p["task_id"]: p[key] for p in results["per_problem"] if key in p} for key in keys}
    return PassAtK(stage, {k: results[k] for k in keys}, per_problem, results["num_problems"],
                   results["metadata"].get("samples_per_problem") or 1, results["problems_solved"])


def _change(a: PassAtK, b: PassAtK, key: str) -> tuple[float, float, str]:
    """b - a and its standard error: paired over problems when both were evaluated on the same ones (which
    problems are hard then cancels out), else from the two standard errors."""
    before, after = a.per_problem.get(key, {}), b.per_problem.get(key, {})
    if before and before.keys() == after.keys():
        tasks = sorted(before)
        diff, se = paired_change([before[t] for t in tasks], [after[t] for t in tasks])
        return diff, se, "paired s.e."
    diff = b.values.get(key, 0.0) - a.values.get(key, 0.0)
    return diff, math.hypot(a.stderr.get(key, 0.0), b.stderr.get(key, 0.0)), "s.e."


def trend(results: Sequence[PassAtK], key: str = "pass@1") -> str:
    """One sentence on whether `key` rises from checkpoint to checkpoint, in standard errors."""
    if len(results) < 2:
        return ""
    steps = []
    for a, b in zip(results, results[1:]):
        diff, se, kind = _change(a, b, key)
        steps.append(f"{a.stage} -> {b.stage} {diff:+.3f}" + (f" ({diff / se:+.1f} {kind})" if se > 0 else ""))
    rising = all(b.values.get(key, 0.0) > a.values.get(key, 0.0) for a, b in zip(results, results[1:]))
    return f"{key} {'rises' if rising else 'does not rise'} at every stage: {'; '.join(steps)}."


def gather(layout: Layout) -> dict[str, Any]:
    """Everything the report shows, from the stages' outputs (missing stages are left out)."""
    state = _json(layout.state) or {"stages": {}, "peak_tflops": 0.0}
    stages = state["stages"]
    evals = {stage: _json(Path(layout.evaluation(stage)) / "results.json") for stage in TRAINED}
    data = {
        "corpus": _json(Path(layout.corpus) / "stats.json"),
        "curation": _json(Path(layout.curated) / "report.json"),
        "pass_at_k": [pass_at_k_of(stage, results) for stage, results in evals.items() if results],
        "summaries": {stage: _json(Path(getattr(layout, stage)) / "summary.json") for stage in TRAINED},
        "configs": {stage: _json(Path(getattr(layout, stage)) / "run_config.json") for stage in TRAINED},
        "stages": stages,
        "invocation": state.get("invocation") or {},
        "peak_tflops": state.get("peak_tflops", 0.0),
        "total_seconds": sum(s.get("seconds", 0.0) for s in stages.values()),
    }
    data["trend"] = trend(data["pass_at_k"])
    data["throughput"] = throughput_rows(layout, data)
    return data


def throughput_rows(layout: Layout, data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage: wall time, and what the stage's work rate is measured in."""
    rows = []
    for name, stage in data["stages"].items():
        row = {"stage": name, "wall": format_duration(stage.get("seconds", 0.0)), "rate": "", "mfu": ""}
        if name in TRAINED:
            t = train_throughput(getattr(layout, name))
            if t["tokens_per_sec_per_device"]:
                row["rate"] = f"{t['tokens_per_sec_per_device']:,.0f} tokens/s/device (train step, {t['steps']} steps)"
            if t["mfu"] is not None:
                row["mfu"] = f"{100 * t['mfu']:.0f}%"
            summary = data["summaries"].get(name) or {}
            if name == "rl" and summary.get("time_split_s"):
                split = summary["time_split_s"]
                row["rate"] += "; " + ", ".join(f"{k} {v:.0f} s" for k, v in split.items() if k != "total")
        elif name.startswith("eval-"):
            results = next((p for p in data["pass_at_k"] if f"eval-{p.stage}" == name), None)
            if results is not None and stage.get("seconds"):
                samples = results.num_problems * results.samples_per_problem
                row["rate"] = f"{samples / stage['seconds']:.1f} samples/s ({samples} sampled and run, end to end)"
        elif name == "curate" and data["curation"]:
            row["rate"] = f"{data['curation'].get('input_megabytes_per_second') or 0:.1f} MB/s of source"
        rows.append(row)
    return rows


# ---- plots ---------------------------------------------------------------------------------------------


def plot_pass_at_k(results: Sequence[PassAtK], path: Path) -> Path:
    keys = sorted({k for r in results for k in r.values}, key=lambda k: int(k.split("@")[1]))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(results))]
        ys = [r.values.get(key, 0.0) for r in results]
        bars = ax.bar(xs, ys, width, yerr=[r.stderr.get(key, 0.0) for r in results], capsize=3, label=key)
        ax.bar_label(bars, labels=[f"{y:.3f}" for y in ys], fontsize=8, padding=2)
    ax.set_xticks(range(len(results)), [r.stage for r in results])
    ax.set_ylabel("held-out pass@k")
    ax.set_title("pass@k per checkpoint (error bars: standard error over problems)", fontsize=9)
    ax.legend()
    ax.set_ylim(0, max([r.values.get(k, 0.0) + r.stderr.get(k, 0.0) for r in results for k in keys] + [0.05]) * 1.25)
    return _save(fig, path)


def plot_losses(runs: dict[str, Path], path: Path) -> Path:
    """Train and held-out loss of each training run, one panel per run."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.6), squeeze=False)
    for ax, (name, run_dir) in zip(axes[0], runs.items()):
        records = read_metrics(run_dir / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
        held_out = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
        if train:
            ax.plot(*zip(*train), label="train")
        if held_out:
            ax.plot(*zip(*held_out), "o-", label="held-out")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
    return _save(fig, path)


def plot_reward(run_dir: Path, path: Path, window: int = 5) -> Path:
    """Reward per rollout batch, its running mean over `window` batches, and the all-tests pass rate."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "rollout"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in records]
    rewards = [r["reward_mean"] for r in records]
    ax.plot(steps, rewards, alpha=0.4, label="reward (batch mean)")
    running = [statistics.fmean(rewards[max(0, i + 1 - window):i + 1]) for i in range(len(rewards))]
    ax.plot(steps, running, linewidth=2, label=f"reward (mean of last {window} batches)")
    if records and "pass_rate" in records[0] and any(r["pass_rate"] != r["reward_mean"] for r in records):
        ax.plot(steps, [r["pass_rate"] for r in records], label="pass rate (all tests)")
    ax.set_xlabel("policy update")
    ax.set_ylabel("reward")
    ax.set_title('RL: reward per rollout batch (the "rl" split)')
    ax.legend()
    return _save(fig, path)


def plot_curation(report: dict[str, Any], path: Path) -> Path:
    names = [name for name in CURATION_STAGES if name in report["stages"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    bars = ax.bar(names, [report["stages"][n]["documents_out"] for n in names])
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("files out")
    ax.set_title(f"curation funnel: {report['stages']['read']['documents_in']} files in")
    ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- rendering -----------------------------------------------------------------------------------------


def curation_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    reasons = report.get("drop_reasons", {})
    return [{"stage": name, **report["stages"][name],
             "dropped": ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.get(name, {}).items()))}
            for name in CURATION_STAGES if name in report["stages"]]


def render(layout: Layout) -> Path:
    """Writes the report under `layout.report`; returns the HTML path."""
    out = Path(layout.report)
    out.mkdir(parents=True, exist_ok=True)
    data = gather(layout)
    images = {}
    if data["pass_at_k"]:
        images["pass_at_k"] = plot_pass_at_k(data["pass_at_k"], out / "pass_at_k.png").name
    runs = {name: Path(getattr(layout, name)) for name in ("pretrain", "sft")
            if (Path(getattr(layout, name)) / "metrics.jsonl").is_file()}
    if runs:
        images["losses"] = plot_losses(runs, out / "loss_curves.png").name
    if (Path(layout.rl) / "metrics.jsonl").is_file():
        images["reward"] = plot_reward(Path(layout.rl), out / "reward_curve.png").name
    if data["curation"]:
        images["curation"] = plot_curation(data["curation"], out / "curation.png").name
        data["curation_rows"] = curation_rows(data["curation"])
    data["images"] = images
    data["format_duration"] = format_duration
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=lambda name: bool(name) and name.endswith(".html.j2"), trim_blocks=True, lstrip_blocks=True)
    env.filters["counts"] = lambda counts: ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"
    env.filters["json"] = lambda value: json.dumps(value, indent=2, sort_keys=True)
    for name in ("report.html", "report.md"):
        (out / name).write_text(env.get_template(f"{name}.j2").render(**data))
    return out / "report.html"


# What a run's record keeps: every input of the report, none of the checkpoints, shards or samples.
RECORD_FILES = (Path(Layout(".").state).name, "data/corpus/stats.json", "data/curated/report.json",
                *(f"{stage}/{name}" for stage in TRAINED for name in ("metrics.jsonl", "run_config.json", "summary.json")),
                *(f"eval/{stage}/{name}" for stage in TRAINED for name in ("results.json", "per_problem.md")),
                "logs/*.log", "report/*")


def export_record(layout: Layout, dest: str | Path) -> Path:
    """Copies the report and its inputs (RECORD_FILES) to `dest`, in the same layout, so that
    `render(Layout(dest))` reproduces the report from the record alone."""
    dest = Path(dest)
    for pattern in RECORD_FILES:
        for path in sorted(Path(layout.root).glob(pattern)):
            target = dest / path.relative_to(layout.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=Layout().root, help="the lifecycle's root directory")
    parser.add_argument("--export", default="", help="also copy the report and its inputs to this directory")
    args = parser.parse_args(argv)
    layout = Layout(args.root)
    print(render(layout))
    if args.export:
        print(export_record(layout, args.export))


if __name__ == "__main__":
    main()
