"""The whole lifecycle at toy sizes (tests/lifecycle/micro_config.py), interrupted during pretraining and
run again: it resumes that stage from its checkpoint, skips the finished ones, and writes the report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MICRO = "tests/lifecycle/micro_config.py"

pytestmark = pytest.mark.slow


def lifecycle(root: Path, log: Path) -> subprocess.Popen:
    """The lifecycle on this machine's own devices (not the test session's simulated mesh), output to `log`."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "lifecycle.run", f"--config={MICRO}:{root}"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.5)


def test_interrupted_lifecycle_resumes_and_reports(tmp_path):
    root = tmp_path / "lifecycle"
    checkpoints = root / "pretrain" / "checkpoints"
    first = lifecycle(root, tmp_path / "first.log")
    try:  # stop it once pretraining has saved its first checkpoint (train.steps=6, checkpoint.every=3)
        wait_for(lambda: first.poll() is not None
                 or (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())), 900)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted (SIGTERM); run the same command again to resume" in output
    state = json.loads((root / "lifecycle.json").read_text())
    assert list(state["stages"]) == ["corpus", "problems", "curate"]

    second = lifecycle(root, tmp_path / "second.log")
    second.wait(timeout=1800)
    output = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, output[-3000:]
    for stage in ("corpus", "problems", "curate"):
        assert re.search(rf"stage \d+/10 {stage}: done before .*, skipped", output)
    assert "resumed from" in (root / "logs" / "pretrain.log").read_text()
    state = json.loads((root / "lifecycle.json").read_text())
    assert list(state["stages"]) == ["corpus", "problems", "curate", "pretrain", "eval-pretrain", "sft", "eval-sft",
                                     "rl", "eval-rl", "report"]
    for stage in ("pretrain", "sft", "rl"):
        results = json.loads((root / "eval" / stage / "results.json").read_text())
        assert results["num_problems"] == 4 and results["num_samples"] == 8
    report = (root / "report" / "report.html").read_text()
    for image in ("pass_at_k.png", "loss_curves.png", "reward_curve.png", "curation.png"):
        assert (root / "report" / image).stat().st_size > 1000
        assert f'src="{image}"' in report
