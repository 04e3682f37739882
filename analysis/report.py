"""Fits, tables and plots from sweep results (the JSONL that `python -m train.sweep` writes).

    python -m analysis.report --results results/scaling/code_isoflop.jsonl \
        results/scaling/code_ablation_arch.jsonl --out_dir results/scaling --bootstrap 200

Per sweep of kind grid/isoflop, `<sweep>_fit.json` and `<sweep>.md` hold, with bootstrap intervals:
Chinchilla Approach 3 (and the same fit in the additive form (Nc/N)^aN + (Dc/D)^aD + Linf), Approach 2
(IsoFLOP parabolas, then power laws in C), the same law per language when runs were evaluated per
language, and the compute-optimal N*(C), D*(C) of each. N is the non-embedding parameter count and C
the model's own FLOP formula (flops_per_token x D), whose LM-head share is large at these sizes:
compute-optimal sizes use it through flops_per_token = 6 N + k N^g fitted to the runs
(analysis.scaling.FlopsPerToken), which tends to 6 N beyond them. Plots: `<sweep>_isoflop.png`,
`<sweep>_contours.png`, `<sweep>_frontier.png`, `<sweep>_residuals.png`.
Per ablation sweep, `<sweep>.md`: mean +- std over seeds per row, difference to the baseline row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import plots
from analysis.ablation import ablation_table
from analysis.scaling import (
    GRIDS,
    AdditiveLaw,
    ChinchillaLaw,
    FlopsPerToken,
    ScalingPoints,
    bootstrap,
    bootstrap_isoflop,
    compute_optimal_numeric,
    fit_chinchilla,
    isoflop_optima,
)
from data.jsonl import read_jsonl

ISOFLOP_TOLERANCE = 0.05  # run FLOPs of one budget differ by the rounding of their step counts


def load_records(paths: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """sweep name -> its records (the latest line per run name), in file order."""
    sweeps: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        for line in read_jsonl(path):
            sweeps.setdefault(line.record["sweep"], {})[line.record["name"]] = line.record
    return {name: list(runs.values()) for name, runs in sweeps.items()}


def points_from_records(records: Sequence[Mapping[str, Any]], loss_key: str, lang: str | None = None) -> ScalingPoints:
    """(non-embedding N, D, loss, model FLOPs) per run; `lang` picks its per-language held-out loss."""
    def loss(r: Mapping[str, Any]) -> float:
        if lang is not None:
            return r["loss_by_lang"][lang]
        return r[loss_key] if r.get(loss_key) is not None else r["eval_loss"]

    return ScalingPoints(np.array([r["n_params_non_embedding"] for r in records], float),
                         np.array([r["tokens"] for r in records], float),
                         np.array([loss(r) for r in records], float),
                         flops=np.array([r["compute"] for r in records], float))


def _json_safe(value: Any) -> Any:
    """NaN and infinities (no optimum in range, an exponent near 0 in the additive form) as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _number(value: float | None, digits: int = 4) -> str:
    return "none" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _interval_text(value: float, bounds: Mapping[str, float]) -> str:
    return f"{_number(value)} [{_number(bounds['low'])}, {_number(bounds['high'])}]"


def _frontier_rows(budgets: np.ndarray, frontiers: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
    return [{"compute": float(c), **{label: {"n_opt": float(n[i]), "d_opt": float(d[i])} for label, (n, d) in frontiers.items()}}
            for i, c in enumerate(budgets)]


def _approach3(points: ScalingPoints, n_bootstrap: int, grid: str, seed: int,
               fpt: FlopsPerToken, budgets: np.ndarray) -> tuple[dict[str, Any], ChinchillaLaw]:
    """Approach 3 on `points`: the fit, its additive form, N*/D* at `budgets`, bootstrap intervals."""
    fit = fit_chinchilla(points, GRIDS[grid])
    additive = AdditiveLaw.from_chinchilla(fit.law)
    n_opt, d_opt = compute_optimal_numeric(fit.law.loss, budgets, fpt)
    result: dict[str, Any] = {**fit.as_dict(), "additive": additive.as_dict(),
                              "compute_optimal": {"n_opt": n_opt.tolist(), "d_opt": d_opt.tolist()},
                              "rms_residual": float(np.sqrt(np.mean((fit.law.loss(points.n_params, points.n_tokens) - points.loss) ** 2)))}
    if n_bootstrap:
        boot = bootstrap(points, fit, n_bootstrap, seed=seed)
        result["bootstrap"] = {"n_resamples": n_bootstrap, "n_failed": boot.n_failed, "level": boot.level,
                               "intervals": boot.intervals(), "additive_intervals": boot.additive_intervals()}
    return result, fit.law


def scaling_report(name: str, records: Sequence[Mapping[str, Any]], out_dir: Path, *, n_bootstrap: int,
                   loss_key: str, grid: str, seed: int = 0) -> dict[str, Any]:
    """Fits, frontier and plots of one grid/isoflop sweep; writes `<name>_fit.json` and `<name>.md`."""
    points = points_from_records(records, loss_key)
    fpt = FlopsPerToken.fit(np.array([r["n_params_non_embedding"] for r in records], float),
                            np.array([r["flops_per_token"] for r in records], float))
    budgets = np.geomspace(points.compute.min() / 2, points.compute.max() * 100, 40)
    table_budgets = np.array(sorted({float(f"{c:.1g}") for c in points.compute}) + [1e13, 1e14, 1e15])
    report: dict[str, Any] = {
        "sweep": name, "n_runs": len(records), "loss": loss_key,
        "flops_per_token_law": {"form": "6 N + coefficient N^exponent", "coefficient": fpt.coefficient,
                                "exponent": fpt.exponent},
        "runs": [{k: r.get(k) for k in ("name", "n_params_non_embedding", "tokens", "compute", "eval_loss",
                                        "eval_loss_smoothed", "loss_by_lang")} for r in records],
    }
    report["approach3"], law = _approach3(points, n_bootstrap, grid, seed, fpt, table_budgets)
    frontiers = {"Approach 3 (model FLOPs)": compute_optimal_numeric(law.loss, budgets, fpt)}
    table = {"approach3": compute_optimal_numeric(law.loss, table_budgets, fpt)}
    optima, power_laws = None, None
    try:
        iso = isoflop_optima(points, ISOFLOP_TOLERANCE)
        power_laws = iso.power_laws(fpt)
        optima = (iso.compute, iso.n_opt, iso.d_opt(fpt))
        report["approach2"] = {
            "optima": {"compute": iso.compute.tolist(), "n_opt": iso.n_opt.tolist(), "d_opt": iso.d_opt(fpt).tolist(),
                       "loss_opt": iso.loss_opt.tolist()},
            "power_laws": {k: {"coefficient": v.coefficient, "exponent": v.exponent} for k, v in power_laws.items()},
        }
        if n_bootstrap:
            report["approach2"]["bootstrap"] = bootstrap_isoflop(points, n_bootstrap, ISOFLOP_TOLERANCE, seed=seed,
                                                                 flops_per_token=fpt)
        frontiers["Approach 2"] = (power_laws["n_opt"](budgets), power_laws["d_opt"](budgets))
        table["approach2"] = (power_laws["n_opt"](table_budgets), power_laws["d_opt"](table_budgets))
    except (ValueError, RuntimeError) as e:
        report["approach2"] = {"error": str(e)}
    langs = sorted({lang for r in records for lang in r.get("loss_by_lang") or {}})
    report["per_language"] = {}
    for lang in langs:
        lang_points = points_from_records(records, loss_key, lang)
        report["per_language"][lang], _ = _approach3(lang_points, n_bootstrap, grid, seed, fpt, table_budgets)
    report["compute_optimal"] = _frontier_rows(table_budgets, table)
    report["plots"] = {
        "isoflop": str(plots.plot_isoflop(points, out_dir / f"{name}_isoflop.png", ISOFLOP_TOLERANCE,
                                          iso if optima is not None else None, law.loss)),
        "contours": str(plots.plot_contours(points, law.loss, out_dir / f"{name}_contours.png",
                                            title=f"{name}: fitted L(N, D), Approach 3",
                                            frontier=frontiers["Approach 3 (model FLOPs)"])),
        "frontier": str(plots.plot_frontier(budgets, frontiers, out_dir / f"{name}_frontier.png", optima, power_laws)),
        "residuals": str(plots.plot_residuals(points, {"Approach 3": law.loss}, out_dir / f"{name}_residuals.png")),
    }
    report = _json_safe(report)
    (out_dir / f"{name}_fit.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out_dir / f"{name}.md").write_text(scaling_markdown(report))
    return report


def scaling_markdown(report: Mapping[str, Any]) -> str:
    """The report's fitted coefficients (with intervals), Approach 2 and the compute-optimal table."""
    a3 = report["approach3"]
    lines = [f"# {report['sweep']}: {report['n_runs']} runs, loss = {report['loss']}", ""]

    def law_rows(fit: Mapping[str, Any], label: str) -> list[str]:
        boot = fit.get("bootstrap", {})
        rows = []
        for key, params, intervals in (("Chinchilla", fit["params"], boot.get("intervals")),
                                       ("additive", fit["additive"], boot.get("additive_intervals"))):
            cells = [(_interval_text(v, intervals[k]) if intervals else _number(v)) for k, v in params.items()]
            rows.append(f"| {label} | {key}: {', '.join(f'{k} {c}' for k, c in zip(params, cells))} | "
                        f"{fit['rms_residual']:.4f} |")
        return rows

    lines += ["## Approach 3 and the additive form (95% bootstrap intervals)", "",
              "| data | law | RMS residual |", "|---|---|---|", *law_rows(a3, "all languages")]
    for lang, fit in report.get("per_language", {}).items():
        lines += law_rows(fit, lang)
    a2 = report["approach2"]
    lines += ["", "## Approach 2 (IsoFLOP parabolas)", ""]
    if "error" in a2:
        lines.append(f"not fitted: {a2['error']}")
    else:
        intervals = a2.get("bootstrap", {}).get("intervals", {})
        for key in ("n_opt", "d_opt"):
            law = a2["power_laws"][key]
            exponent = intervals.get(f"{key}_exponent")
            text = _interval_text(law["exponent"], exponent) if exponent else f"{law['exponent']:.4g}"
            lines.append(f"- {key} = {law['coefficient']:.4g} C^{text}")
        lines.append("- minima: " + ", ".join(f"C {c:.3g}: N* {n:.3g}, D* {d:.3g}, loss {l_:.4f}" for c, n, d, l_ in zip(
            a2["optima"]["compute"], a2["optima"]["n_opt"], a2["optima"]["d_opt"], a2["optima"]["loss_opt"])))
    lines += ["", "## Compute-optimal allocation (C by the model's FLOP formula)", "",
              "| C (FLOPs) | " + " | ".join(f"{k} N* / D*" for k in report["compute_optimal"][0] if k != "compute") + " |",
              "|---|" + "---|" * (len(report["compute_optimal"][0]) - 1)]
    # none: the law's minimum over N lies at the search bound (no interior optimum at that budget)
    for row in report["compute_optimal"]:
        cells = [f"{_number(row[k]['n_opt'], 3)} / {_number(row[k]['d_opt'], 3)}" for k in row if k != "compute"]
        lines.append(f"| {row['compute']:.3g} | " + " | ".join(cells) + " |")
    fpt = report["flops_per_token_law"]
    lines += ["", f"FLOPs per token fitted over the runs: 6 N + {fpt['coefficient']:.4g} N^{fpt['exponent']:.4f}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, nargs="+", required=True, help="results JSONL file(s) of train.sweep")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples per interval (0: none)")
    parser.add_argument("--loss", default="eval_loss_smoothed", choices=["eval_loss_smoothed", "eval_loss"])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="hoffmann", help="Approach 3's L-BFGS starts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    try:
        for name, records in load_records(args.results).items():
            if records[0]["kind"] == "ablation":
                path = args.out_dir / f"{name}.md"
                path.write_text(f"# {name}: held-out loss over seeds\n\n" + ablation_table(records) + "\n")
                summary[name] = str(path)
            else:
                report = scaling_report(name, records, args.out_dir, n_bootstrap=args.bootstrap, loss_key=args.loss,
                                        grid=args.grid, seed=args.seed)
                summary[name] = {"approach3": report["approach3"]["params"],
                                 "additive": report["approach3"]["additive"],
                                 "approach2": report["approach2"].get("power_laws", report["approach2"]),
                                 "compute_optimal": report["compute_optimal"]}
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(_json_safe(summary), indent=2))


if __name__ == "__main__":
    main()
