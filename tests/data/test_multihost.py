"""Two real JAX processes (jax.distributed on CPU) read disjoint shards covering the data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from configs.schema import to_dict
from data.config import DataConfig, SourceConfig
from tests.data.conftest import code_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_cover_the_data_once(tmp_path: Path, tokenizer_path: Path) -> None:
    records = code_records(23, seed=5)
    write_jsonl(tmp_path / "docs.jsonl", records)
    cfg = DataConfig(
        sources={"docs": SourceConfig(kind="jsonl", splits={"train": str(tmp_path / "docs.jsonl")})},
        tokenizer_path=str(tokenizer_path),
        seq_len=2048,
        batch_size=4,
        num_epochs=1,
    )
    settings = json.dumps({"data": to_dict(cfg), "tokenizer": str(tokenizer_path)})
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.data.multihost_worker", coordinator, str(pid), "2", settings,
             str(tmp_path / f"out{pid}.json")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for pid in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]

    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert r["process_count"] == 2 and r["local_rows"] == 2
        assert r["global_shape"] == [4, 2048] and r["local_view_matches"]
        assert r["first_global_row"] == 2 * r["process_index"]
    assert not set(results[0]["documents"]) & set(results[1]["documents"])
    assert Counter(results[0]["documents"] + results[1]["documents"]) == Counter(r["text"] for r in records)
