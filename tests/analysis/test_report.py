"""analysis.report and analysis.ablation on results JSONL written from known laws."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis import report
from analysis.ablation import RowStats, ablation_table, exceeds_spread
from analysis.scaling import AdditiveLaw, compute_optimal_numeric

TRUE = AdditiveLaw(Nc=3e4, Dc=2e5, alpha_N=0.3, alpha_D=0.6, L_inf=2.0)
HEAD = 4096 * 64  # an LM head's matmul parameters: a fixed FLOPs-per-token share, as in tiny models


def flops_per_token(n: np.ndarray) -> np.ndarray:
    return 6.0 * (np.asarray(n, float) + HEAD)


def scaling_records(noise: float = 0.0) -> list[dict]:
    """An IsoFLOP sweep of 4 budgets x 6 sizes whose losses follow TRUE, with per-language losses."""
    rng = np.random.default_rng(0)
    records = []
    for budget in (1e12, 2e12, 4e12, 8e12):
        for n in np.geomspace(1e4, 1e6, 6):
            fpt = float(flops_per_token(n))
            tokens = budget / fpt
            loss = float(TRUE.loss(n, tokens)) * math.exp(noise * rng.standard_normal())
            records.append({"sweep": "iso", "name": f"n{n:.0f}-C{budget:.0e}", "kind": "isoflop",
                            "n_params_non_embedding": n, "n_params": n + HEAD, "tokens": tokens,
                            "flops_per_token": fpt, "compute": budget, "eval_loss": loss, "eval_loss_smoothed": loss,
                            "loss_by_lang": {"python": loss, "c": loss + 0.5}})
    return records


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_recovers_the_law_and_writes_its_outputs(tmp_path, capsys):
    write_jsonl(tmp_path / "iso.jsonl", scaling_records())
    report.main(["--results", str(tmp_path / "iso.jsonl"), "--out_dir", str(tmp_path / "out"), "--bootstrap", "10",
                 "--grid", "coarse"])
    fit = json.loads((tmp_path / "out" / "iso_fit.json").read_text())
    for name, value in TRUE.as_dict().items():
        assert fit["approach3"]["additive"][name] == pytest.approx(value, rel=1e-3), name
    python = fit["per_language"]["python"]["additive"]
    assert python["alpha_N"] == pytest.approx(TRUE.alpha_N, rel=1e-3)
    assert fit["per_language"]["c"]["additive"]["L_inf"] == pytest.approx(TRUE.L_inf + 0.5, rel=1e-3)
    # Compute-optimal sizes under the model's own FLOPs, whose 6 N + k N^g form holds exactly here (g = 0).
    assert fit["flops_per_token_law"]["coefficient"] == pytest.approx(6.0 * HEAD, rel=1e-6)
    row = next(r for r in fit["compute_optimal"] if r["compute"] == 2e12)
    n_true, d_true = compute_optimal_numeric(TRUE.loss, 2e12, flops_per_token)
    assert row["approach3"]["n_opt"] == pytest.approx(float(n_true), rel=0.01)
    assert row["approach3"]["d_opt"] == pytest.approx(float(d_true), rel=0.01)
    assert "error" not in fit["approach2"] and len(fit["approach2"]["optima"]["compute"]) >= 2
    for plot in ("isoflop", "contours", "frontier", "residuals"):
        assert (tmp_path / "out" / f"iso_{plot}.png").stat().st_size > 10_000
    markdown = (tmp_path / "out" / "iso.md").read_text()
    assert "Approach 2" in markdown and "| python |" in markdown
    assert json.loads(capsys.readouterr().out)["iso"]["additive"]["L_inf"] == pytest.approx(TRUE.L_inf, rel=1e-3)


def ablation_records(rows: dict[str, list[float]]) -> list[dict]:
    return [{"sweep": "abl", "name": f"{row}-s{i}", "kind": "ablation", "row": row, "seed": i, "baseline": "base",
             "eval_loss": v, "loss_by_lang": {"python": v - 0.1}} for row, values in rows.items() for i, v in enumerate(values)]


def test_ablation_table_means_diffs_and_the_seed_spread_rule():
    table = ablation_table(ablation_records({"base": [3.0, 3.1, 3.2], "far": [3.6, 3.7, 3.8], "near": [3.05, 3.15, 3.25]}))
    lines = table.splitlines()
    assert lines[2].startswith("| base (baseline) | 3 | 3.1000 ± 0.1000 | 3.0000 ± 0.1000 |")
    assert lines[3].endswith("| +0.6000 | yes |")  # 0.6 > 2 * sqrt(0.01/3 + 0.01/3) = 0.163
    assert lines[4].endswith("| +0.0500 | no |")


def test_exceeds_spread_needs_two_seeds():
    assert exceeds_spread(RowStats("a", (1.0,)), RowStats("b", (2.0, 2.1))) is None


def test_ablation_report_through_the_cli(tmp_path, capsys):
    write_jsonl(tmp_path / "abl.jsonl", ablation_records({"base": [3.0, 3.1], "x": [3.0, 3.2]}))
    report.main(["--results", str(tmp_path / "abl.jsonl"), "--out_dir", str(tmp_path)])
    assert "| x | 2 |" in (tmp_path / "abl.md").read_text()
    with pytest.raises(ValueError, match="baseline row 'nope'"):
        ablation_table(ablation_records({"base": [3.0]}), baseline="nope")
