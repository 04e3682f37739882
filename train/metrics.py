"""Run metrics: JSONL and TensorBoard event files, a progress line with ETA, MFU, loss-curve plots."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from data.jsonl import read_jsonl

# Dense bf16 peak FLOP/s per device (vendor datasheets). MFU is reported against these.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override if given, else the datasheet value, else None."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS_BY_DEVICE_KIND.items():
        if kind.startswith(name):
            return flops
    return None


def summarize(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Flattens step metrics to scalars: per-layer vectors [L] become `name` (mean) and `name/layer_i`;
    [L, E] arrays (e.g. per-expert load) become `name/layer_i/max_over_mean`."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 0:
            out[name] = float(value)
        elif value.ndim == 1:
            out[name] = float(value.mean())
            out.update({f"{name}/layer_{i}": float(v) for i, v in enumerate(value)})
        elif value.ndim == 2:
            ratio = value.max(axis=1) / np.maximum(value.mean(axis=1), 1e-12)
            out.update({f"{name}/layer_{i}/max_over_mean": float(r) for i, r in enumerate(ratio)})
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepTimer:
    """Seconds per training step between laps, not counting paused time (evaluation, checkpoint
    saves), so tokens/s and MFU describe the train step whatever the eval and log intervals."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.start()

    def start(self) -> None:
        self._run_start = self._window_start = self._clock()
        self._paused, self._steps = 0.0, 0

    def step(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self, sync: Any = None) -> Iterator[None]:
        """Excludes the block's time; `sync` (arrays) is waited for first, so work already
        dispatched for the window's steps is counted in them."""
        if sync is not None:
            jax.block_until_ready(sync)
        begin = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - begin

    def lap(self) -> float:
        """Mean step time since the previous lap; call after the window's results were fetched."""
        now = self._clock()
        per_step = (now - self._window_start - self._paused) / max(self._steps, 1)
        self._window_start, self._paused, self._steps = now, 0.0, 0
        return per_step

    def elapsed(self) -> float:
        return self._clock() - self._run_start


class MetricsLogger:
    """Writes metrics to `<dir>/metrics.jsonl` and TensorBoard events (process 0 only)."""

    def __init__(self, directory: str | Path, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.directory = Path(directory)
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy import, process 0 only)

            self.directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = (self.directory / "metrics.jsonl").open("a")
            self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, **{k: v for k, v in values.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{name}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def progress_line(step: int, total: int, values: Mapping[str, float], elapsed: float, steps_done: int) -> str:
    """`step 120/300 (40%) | loss 3.412 | 5.1k tok/s | MFU 31.0% | 2m10s elapsed, ETA 3m15s`."""
    eta = elapsed / max(steps_done, 1) * (total - step)
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)", f"loss {values.get('loss', float('nan')):.4f}"]
    if "tokens_per_sec" in values:
        parts.append(f"{values['tokens_per_sec'] / 1e3:.1f}k tok/s")
    if values.get("mfu") is not None and "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    parts.append(f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")
    return " | ".join(parts)


def print_progress(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl."""
    return [line.record for line in read_jsonl(path)]


def plot_loss_curve(
    metrics_path: str | Path, out_png: str | Path, title: str = "", baselines: Mapping[str, float] | None = None
) -> Path:
    """Plots train loss (and eval loss, if any) against step from a metrics.jsonl, with optional
    horizontal baselines (e.g. {"unigram entropy": 6.6})."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for split, style in (("train", "-"), ("eval", "o-")):
        points = sorted({r["step"]: r["loss"] for r in records if r.get("split") == split and "loss" in r}.items())
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=f"{split} loss")
    for i, (label, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, color=f"C{i + 2}", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
