"""The Beam curation pipeline against the local multiprocessing driver, and its shuffle volume.

Run in the Beam environment (launch/dataflow_requirements.txt):

    python -m bench.prepare_beam [--workers=2] [--fractions=0.25,0.5,1]

1. Throughput: the running interpreter's standard library tree (as `bench.prepare`), curated down
   to its Python files by the local driver (`--workers` processes) and by the Beam pipeline on the
   DirectRunner (`--workers` worker processes, multi_processing), each timed in this process from
   the call to its return; both reports must agree. MB/s of Python source reaching the stages.
2. Shuffle volume: JSONL corpora of the first 25%, 50%, 100% of the tree's Python files, run on
   the in-process runner with every shuffle's input measured (pickled bytes, counted with Beam
   metrics), per shuffle and in total, against the corpus bytes.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from data.code import config as config_lib
from data.code import preparation
from data.curation import pipeline

RUN_FIELDS = ("output_dir", "workers", "runner", "seconds", "input_megabytes_per_second", "config", "shuffle_bytes")


def python_config(workers: int):
    config = config_lib.default_prepare_config()
    config.language.languages = "python"
    config.workers = workers
    return config


def comparable(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in RUN_FIELDS} | {"output": {**report["output"], "shards": None}}


def throughput(corpus: str, workers: int) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_beam_") as directory:
        start = time.perf_counter()
        local = preparation.prepare([corpus], os.path.join(directory, "local"), python_config(workers))
        runs["local_multiprocessing"] = (time.perf_counter() - start, local)
        args = ["--runner=DirectRunner", f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        start = time.perf_counter()
        beam = pipeline.run([corpus], os.path.join(directory, "beam"), python_config(workers), pipeline_args=args)
        runs["beam_direct_runner"] = (time.perf_counter() - start, beam)
    if comparable(local) != comparable(beam):
        raise AssertionError("the Beam pipeline's report differs from the local driver's")
    source_mb = local["stages"]["language"]["bytes_out"] / 1e6
    return {
        "source_megabytes": round(source_mb, 2),
        "reports_equal": True,
        "output_records": local["output"]["records"],
        **{name: {"wall_s": round(seconds, 2), "source_megabytes_per_s": round(source_mb / seconds, 3)} for name, (seconds, _) in runs.items()},
    }


def shuffle_volume(corpus: str, fractions: list[float]) -> list[dict]:
    paths = sorted(Path(corpus).rglob("*.py"))
    paths = [p for p in paths if "site-packages" not in p.parts and p.stat().st_size <= 1_000_000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_shuffle_") as directory:
        for fraction in fractions:
            jsonl = os.path.join(directory, f"corpus-{fraction}.jsonl")
            with open(jsonl, "w", encoding="utf-8") as file:
                for path in paths[: int(len(paths) * fraction)]:
                    try:
                        text = path.read_text(encoding="utf-8")
                    except UnicodeDecodeError:
                        continue
                    file.write(json.dumps({"text": text, "path": str(path.relative_to(corpus))}) + "\n")
            report = pipeline.run([jsonl], os.path.join(directory, f"out-{fraction}"), python_config(0), measure_shuffle=True)
            total = sum(report["shuffle_bytes"].values())
            source = report["stages"]["read"]["bytes_in"]
            rows.append({
                "fraction": fraction,
                "documents": report["stages"]["read"]["documents_in"],
                "source_megabytes": round(source / 1e6, 2),
                "shuffle_megabytes": round(total / 1e6, 2),
                "shuffle_per_source_byte": round(total / source, 3),
                "by_shuffle_megabytes": {name: round(value / 1e6, 3) for name, value in report["shuffle_bytes"].items()},
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fractions", default="0.25,0.5,1")
    args = parser.parse_args()
    corpus = sysconfig.get_paths()["stdlib"]
    result = {
        "benchmark": "prepare_beam_vs_local",
        "corpus": corpus,
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "throughput": throughput(corpus, args.workers),
        "shuffle_volume": shuffle_volume(corpus, [float(f) for f in args.fractions.split(",")]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
