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
