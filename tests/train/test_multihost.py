"""Multi-host rehearsal: 2 processes x 4 simulated CPU devices (jax.distributed, fsdp over all 8)
train the tiny preset, are killed after a checkpoint, resume, and end with the losses of 1 process x
8 devices. Data uses global host sharding, so the batches do not depend on the process count."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.train.conftest import compilation_cache_env

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 10, 4

CONFIG = """
from pathlib import Path
from tests.train.conftest import small_run_config

def get_config(arg=""):
    cfg = small_run_config(Path({corpus!r}), Path({out!r}))
    cfg.model = cfg.model.__class__({{"preset": "tiny", "vocab_size": 512}})
    cfg.data.seq_len = 64
    cfg.data.batch_size = 8
    cfg.data.host_sharding = "global"
    cfg.mesh.ici.fsdp = -1
    cfg.train.steps = {steps}
    cfg.checkpoint.every = {every}
    cfg.checkpoint.async_save = True
    cfg.sampler.prompt = ""
    return cfg
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(corpus_dir: Path, out: Path, processes: int, cache_dir: Path) -> list[subprocess.Popen]:
    """`processes` training processes with 8 / processes CPU devices each, as launch/local_multiprocess.sh;
    they share the compilation cache `cache_dir` (a resumed run does not compile again)."""
    config = out.with_suffix(".config.py")
    config.write_text(CONFIG.format(corpus=str(corpus_dir), out=str(out), steps=STEPS, every=EVERY))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    base.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}", **compilation_cache_env(cache_dir))
    if processes > 1:
        base.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    return [
        subprocess.Popen([sys.executable, "-m", "train.pretrain", f"--config={config}"], cwd=ROOT,
                         env={**base, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for i in range(processes)
    ]


def finish(procs: list[subprocess.Popen]) -> str:
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    return outputs[0]


def losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def checkpoints(out: Path) -> set[int]:
    directory = out / "checkpoints"
    return {int(p.name) for p in directory.iterdir() if p.name.isdigit()} if directory.exists() else set()


def test_two_processes_killed_and_resumed_match_one_process(corpus_dir, tmp_path, compilation_cache_dir):
    reference = tmp_path / "one_process"
    finish(launch(corpus_dir, reference, processes=1, cache_dir=compilation_cache_dir))

    run = tmp_path / "two_processes"
    procs = launch(corpus_dir, run, processes=2, cache_dir=compilation_cache_dir)
    deadline = time.monotonic() + 600
    while not (EVERY in checkpoints(run) and max(losses(run), default=0) > EVERY):
        assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert max(checkpoints(run)) < STEPS

    output = finish(launch(corpus_dir, run, processes=2, cache_dir=compilation_cache_dir))
    assert "resumed from" in output and "mesh {'data': 1, 'fsdp': 8" in output
    want, got = losses(reference), losses(run)
    assert sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5)
