"""The lifecycle report in a real headless browser: the committed report renders and every image loads,
and the report rebuilt from the committed record (its inputs) does too, with the record's numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from configs.lifecycle.layout import Layout
from lifecycle.report import render

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "results" / "lifecycle"  # written by `python -m lifecycle.report --export=results/lifecycle`
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `make system-deps` installs Debian's chromium package")
    return path


def open_page(html: Path) -> dict[str, Any]:
    """Loads `html` in headless Chromium; returns its title, images (src, loaded, width) and table rows."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(html.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,"
                                   " i.naturalWidth, i.naturalHeight])")
            rows = page.evaluate("Array.from(document.querySelectorAll('#pass-at-k + table tr')).map("
                                 "r => Array.from(r.cells).map(c => c.innerText))")
            return {"title": page.title(), "images": images, "pass_at_k_rows": rows, "errors": errors,
                    "height": page.evaluate("document.body.scrollHeight")}
        finally:
            browser.close()


def check_page(page: dict[str, Any]) -> None:
    assert page["title"] == "codelm lifecycle report"
    assert not page["errors"]
    assert page["height"] > 1000  # laid out, not an empty page
    sources = [src for src, *_ in page["images"]]
    assert sorted(sources) == ["curation.png", "loss_curves.png", "pass_at_k.png", "reward_curve.png"]
    for src, loaded, width, height in page["images"]:
        assert loaded and width > 100 and height > 100, f"{src} did not load ({width}x{height})"


def test_committed_report_renders_and_every_image_loads():
    check_page(open_page(RECORD / "report" / "report.html"))


def test_report_rebuilt_from_the_record_shows_its_numbers(tmp_path):
    root = tmp_path / "lifecycle"
    shutil.copytree(RECORD, root)
    shutil.rmtree(root / "report")
    html = render(Layout(str(root)))
    page = open_page(html)
    check_page(page)
    header, *rows = page["pass_at_k_rows"]
    assert [row[0] for row in rows] == ["pretrain", "sft", "rl"]
    markdown = (root / "report" / "report.md").read_text()
    for row, stage in zip(rows, ("pretrain", "sft", "rl")):
        results = json.loads((root / "eval" / stage / "results.json").read_text())
        shown = f"{results['pass@1']:.3f}"
        assert row[1].startswith(shown), (stage, row)
        assert f"| {stage} | {shown} ± " in markdown
    ks = sorted((k for k in results if k.startswith("pass@")), key=lambda k: int(k[5:]))
    assert [cell.split(" ")[0] for cell in header[1:1 + len(ks)]] == ks


def test_the_trend_pairs_problems_evaluated_at_both_checkpoints():
    from evals.passk import paired_change
    from lifecycle.report import pass_at_k_of, trend

    def results(scores: list[float], tasks: list[str]) -> dict[str, Any]:
        return {"pass@1": sum(scores) / len(scores), "num_problems": len(scores), "problems_solved": 0,
                "metadata": {"samples_per_problem": 10},
                "per_problem": [{"task_id": t, "pass@1": s} for t, s in zip(tasks, scores)]}

    tasks = ["a", "b", "c", "d"]
    before, after = [0.0, 0.2, 0.9, 1.0], [0.1, 0.3, 1.0, 1.0]  # every problem rises a little
    sentence = trend([pass_at_k_of("sft", results(before, tasks)), pass_at_k_of("rl", results(after, tasks))])
    diff, se = paired_change(before, after)
    assert sentence == f"pass@1 rises at every stage: sft -> rl {diff:+.3f} ({diff / se:+.1f} paired s.e.)."
    # Other problems: no pairing, the two standard errors combined (a far smaller ratio here).
    unpaired = trend([pass_at_k_of("sft", results(before, tasks)), pass_at_k_of("rl", results(after, list("wxyz")))])
    assert unpaired.endswith(" s.e.).") and "paired" not in unpaired
