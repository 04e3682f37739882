"""Crash safety with real processes: SIGKILL after a checkpoint then resume reproduces the
uninterrupted run's per-step losses bitwise; SIGTERM saves a checkpoint at the current step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.conftest import compilation_cache_env

ROOT = Path(__file__).resolve().parents[2]

CONFIG_TEMPLATE = """
from pathlib import Path
from tests.train.conftest import small_run_config

def get_config(arg=""):
    cfg = small_run_config(Path({corpus!r}), Path({out!r}))
    cfg.model.d_model = 128
    cfg.data.seq_len = 128
    cfg.train.steps = {steps}
    cfg.checkpoint.every = {every}
    cfg.checkpoint.async_save = True
    cfg.sampler.prompt = ""  # no sample completion at the end: these tests check losses and checkpoints
    return cfg
"""


def start(corpus_dir: Path, out: Path, steps: int, every: int, cache_dir: Path) -> subprocess.Popen:
    config = out.with_suffix(".config.py")
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG_TEMPLATE.format(corpus=str(corpus_dir), out=str(out), steps=steps, every=every))
    # One CPU device, like a fresh shell; a resumed run reuses its first compilation from the cache.
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), **compilation_cache_env(cache_dir)}
    return subprocess.Popen([sys.executable, "-m", "train.pretrain", f"--config={config}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def step_losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def finished_checkpoints(out: Path) -> set[int]:
    ckpt = out / "checkpoints"
    return {int(p.name) for p in ckpt.iterdir() if p.name.isdigit()} if ckpt.exists() else set()


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for training progress")
        time.sleep(0.02)


def test_sigkill_then_resume_reproduces_losses_bitwise(corpus_dir, tmp_path, compilation_cache_dir):
    steps, every = 24, 8
    reference = start(corpus_dir, tmp_path / "reference", steps, every, compilation_cache_dir)
    crashed_dir = tmp_path / "crashed"
    crashed = start(corpus_dir, crashed_dir, steps, every, compilation_cache_dir)
    # Kill hard once checkpoint 8 is complete and training has moved past it (its steps are lost).
    wait_until(lambda: 8 in finished_checkpoints(crashed_dir) and max(step_losses(crashed_dir), default=0) >= 10, crashed)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]
    assert max(finished_checkpoints(crashed_dir)) < steps

    resumed = start(corpus_dir, crashed_dir, steps, every, compilation_cache_dir)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from" in output
    want, got = step_losses(tmp_path / "reference"), step_losses(crashed_dir)  # resumed steps overwrite
    assert sorted(want) == list(range(1, steps + 1))
    assert {s: got[s] for s in want} == want  # bitwise: floats compared exactly


def test_sigterm_saves_a_checkpoint_at_the_current_step(corpus_dir, tmp_path, compilation_cache_dir):
    out = tmp_path / "preempted"
    proc = start(corpus_dir, out, steps=200, every=1000, cache_dir=compilation_cache_dir)
    wait_until(lambda: max(step_losses(out), default=0) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, output[-3000:]
    saved = int(output.split("preempted: checkpoint saved at step ")[1].split()[0])
    assert saved >= 3 and finished_checkpoints(out) == {saved}
    assert max(step_losses(out)) <= saved
