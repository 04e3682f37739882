"""Ablation tables: held-out loss per config row over seeds, against a baseline row.

    table = ablation_table(records)      # records: the results JSONL of an ablation sweep (train.sweep)

A row's difference to the baseline "exceeds the seed spread" when |mean - baseline mean| is more than
twice the standard error of that difference, sqrt(s_row^2 / n_row + s_base^2 / n_base) with s the
seed standard deviation (ddof 1): about a 95% two-sided test under normal seed noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

SPREAD_Z = 2.0


@dataclasses.dataclass(frozen=True)
class RowStats:
    """One row's metric over its seeds."""

    row: str
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan


def row_stats(records: Iterable[Mapping[str, Any]], metric: str) -> dict[str, RowStats]:
    """row -> its values of `metric` (a record key, or "loss_by_lang.<lang>"), rows in first-seen order."""
    values: dict[str, list[float]] = {}
    for record in records:
        value: Any = record
        for key in metric.split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None:
            values.setdefault(record["row"], []).append(float(value))
    return {row: RowStats(row, tuple(v)) for row, v in values.items()}


def exceeds_spread(row: RowStats, base: RowStats, z: float = SPREAD_Z) -> bool | None:
    """Whether |row mean - base mean| > z standard errors of the difference (None: too few seeds)."""
    if len(row.values) < 2 or len(base.values) < 2:
        return None
    se = math.sqrt(row.std**2 / len(row.values) + base.std**2 / len(base.values))
    return abs(row.mean - base.mean) > z * se


def ablation_table(records: Sequence[Mapping[str, Any]], baseline: str | None = None,
                   metric: str = "eval_loss") -> str:
    """A Markdown table: row, seeds, mean +- std of `metric`, the same per language when the records
    carry `loss_by_lang`, pass@1 when they carry `pass_at_1`, and the difference to the baseline."""
    if not records:
        raise ValueError("ablation_table: no records")
    baseline = baseline or records[0].get("baseline") or records[0]["row"]
    stats = row_stats(records, metric)
    if baseline not in stats:
        raise ValueError(f"ablation_table: baseline row {baseline!r} not in rows {sorted(stats)}")
    langs = sorted({lang for r in records for lang in r.get("loss_by_lang") or {}})
    extra = [(f"loss_by_lang.{lang}", lang) for lang in langs]
    if any("pass_at_1" in r for r in records):
        extra.append(("pass_at_1", "pass@1"))
    extra_stats = {key: row_stats(records, key) for key, _ in extra}
    header = ["row", "seeds", f"held-out loss ({metric})", *[label for _, label in extra], "diff to baseline",
              f"exceeds seed spread ({SPREAD_Z:g} SE)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = stats[baseline]
    for row, s in stats.items():
        cells = [row + (" (baseline)" if row == baseline else ""), str(len(s.values)), f"{s.mean:.4f} ± {s.std:.4f}"]
        for key, _ in extra:
            e = extra_stats[key].get(row)
            cells.append(f"{e.mean:.4f} ± {e.std:.4f}" if e else "")
        if row == baseline:
            cells += ["", ""]
        else:
            verdict = exceeds_spread(s, base)
            cells += [f"{s.mean - base.mean:+.4f}", {True: "yes", False: "no", None: "n/a"}[verdict]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
