"""The local driver behind `python -m data.prepare` (the Beam pipeline is `data.curation`).

Main process: reads inputs (`inputs`), batches them and takes the decisions that need state across
documents; worker processes run the pure per-file stages (`stages.FileStages`). Batches go out and
come back in input order with a bounded number in flight, so the output is identical for any
number of workers. Three steps:
  1. stream: per-file stages, exact dedup, the near-duplicate graph (`dedup`); survivors of exact
     dedup are held, in memory up to 256 MiB of text, beyond that in an ArrayRecord spill file.
  2. decide: the near-duplicate components are final once every document is in; each file's
     decision is counted, and kept files are grouped by `documents.group_key`.
  3. write: groups in input order (of their first file) are read back, made into documents
     (`documents`) and written as ArrayRecord shards.
Beyond the held text, memory holds per document only its dedup keys and a few integers. Progress (files, MB, MB/s,
records written) is logged every `config.progress_seconds`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ml_collections
from absl import logging
from array_record.python import array_record_module

from data.code import config as config_lib
from data.code import decontam, dedup, documents, inputs, shards, stages
from data.code import report as report_lib

_worker_stages: stages.FileStages | None = None


def _start_worker(file_stages: stages.FileStages) -> None:
    global _worker_stages
    _worker_stages = file_stages


def _run_worker(batch: list[inputs.InputFile]) -> list[stages.FileOutcome]:
    """Outcomes of the readable files of a batch."""
    assert _worker_stages is not None, "worker used before _start_worker"
    return _worker_stages([item.record for item in batch if item.record is not None])


class _Spill:
    """Kept files between the streaming step and the write step: held in memory up to
    `memory_bytes` of text, beyond that pickled to an uncompressed ArrayRecord file at `path`."""

    def __init__(self, path: str, memory_bytes: int):
        self.path = path
        self.memory_bytes = memory_bytes
        self._items: list[Any] = []
        self._bytes = 0
        self._writer: Any = None
        self._reader: Any = None

    def append(self, item: Any, size: int) -> None:
        self._bytes += size
        if self._writer is None and self._bytes > self.memory_bytes:
            self._writer = array_record_module.ArrayRecordWriter(self.path, "group_size:1,uncompressed")
            for held in self._items:
                self._writer.write(pickle.dumps(held, protocol=pickle.HIGHEST_PROTOCOL))
            self._items = []
        if self._writer is None:
            self._items.append(item)
        else:
            self._writer.write(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))

    def read(self, indices: list[int]) -> list[Any]:
        if self._writer is None:
            return [self._items[index] for index in indices]
        if self._reader is None:
            self._writer.close()
            self._reader = array_record_module.ArrayRecordReader(self.path)
        return [pickle.loads(data) for data in self._reader.read(indices)]

    def close(self) -> None:
        for handle in (self._reader, self._writer):
            if handle is not None:
                handle.close()
        if os.path.exists(self.path):
            os.remove(self.path)


@contextlib.contextmanager
def _worker_pool(file_stages: stages.FileStages, workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator[tuple[Any, Any]]]]:
    """Yields `ordered_map(function, tasks)` -> (task, function(task)) in task order, run by
    `workers` processes (in this one for 0) with at most 2 * workers + 2 tasks in flight."""
    if workers == 0:
        _start_worker(file_stages)
        yield lambda function, tasks: ((task, function(task)) for task in tasks)
        return
    context = multiprocessing.get_context("spawn")  # safe even when the parent has imported JAX
    with concurrent.futures.ProcessPoolExecutor(workers, context, _start_worker, (file_stages,)) as pool:

        def ordered_map(function: Callable, tasks: Iterable) -> Iterator[tuple[Any, Any]]:
            pending: collections.deque = collections.deque()
            for task in tasks:
                pending.append((task, pool.submit(function, task)))
                if len(pending) > 2 * workers + 2:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()

        yield ordered_map


def _batches(items: Iterable[inputs.InputFile], max_files: int, max_bytes: int) -> Iterator[list[inputs.InputFile]]:
    batch: list[inputs.InputFile] = []
    size = 0
    for item in items:
        batch.append(item)
        size += item.size
        if len(batch) >= max_files or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_contamination_index(config: ml_collections.ConfigDict) -> decontam.ContaminationIndex:
    fields = config_lib.split_list(config.decontam.fields)
    problems = []
    for name in config_lib.split_list(config.decontam.benchmarks):
        problems += decontam.BUILTIN_BENCHMARKS[name](fields)
    for path in config_lib.split_list(config.decontam.eval_files):
        problems += decontam.load_problems_jsonl(path, fields)
    return decontam.ContaminationIndex(problems, config.decontam.ngram)


_SPILL_NAME = ".prepare-spill.array_record"
SPILL_MEMORY_BYTES = 1 << 28  # kept text held in memory before spilling to disk


def prepare(
    input_paths: Sequence[str],
    output_dir: str,
    config: ml_collections.ConfigDict,
    tokenizer: Any | None = None,
) -> dict[str, Any]:
    """Curates `input_paths` into ArrayRecord shards in `output_dir`; returns the JSON report.

    Args:
      input_paths: JSONL(.gz) and Parquet files, glob patterns of them, directory trees of repositories.
      output_dir: receives `{prefix}-NNNNN-of-NNNNN.array_record` and `report.json`.
      config: a `config.default_prepare_config()` (validated here).
      tokenizer: optional; repository documents then carry "tokens" with spliced separators.
    """
    config_lib.validate_prepare_config(config)
    if not input_paths:
        raise ValueError("no inputs given")
    started = time.perf_counter()
    index = build_contamination_index(config) if config.decontam.enabled else None
    file_stages = stages.FileStages(config.to_dict(), index, tokenizer)
    workers = (os.cpu_count() or 1) if config.workers == -1 else config.workers
    counts: collections.Counter[str] = collections.Counter()

    def count(name: str, value: int) -> None:
        counts[name] += value

    exact = dedup.ExactDeduplicator()
    near = dedup.NearDuplicateGraph(
        file_stages.bands, file_stages.rows, config.near_dedup.threshold, config.near_dedup.verify, config.near_dedup.candidates
    )
    writer = shards.ShardWriter(output_dir, config.output.prefix, config.output.records_per_shard, config.output.max_shard_bytes)
    items = inputs.read_inputs(
        input_paths, config_lib.split_list(config.read.exclude), config.read.single_repo, config.read.max_file_bytes,
        inputs.parse_fields(config.read.fields),
    )
    spill = _Spill(os.path.join(output_dir, _SPILL_NAME), SPILL_MEMORY_BYTES)
    progress = _Progress(counts, writer, started, config.progress_seconds)
    # Per spilled file: doc_id, size as read, group key.
    spilled: list[tuple[int, int, str]] = []
    try:
        with writer, _worker_pool(file_stages, workers) as ordered_map:
            for batch, outcomes in ordered_map(_run_worker, _batches(items, config.batch_files, config.batch_bytes)):
                readable = iter(outcomes)
                for item in batch:
                    if item.record is None:
                        report_lib.dropped(count, "read", item.size, item.drop_reason)
                        continue
                    outcome = next(readable)
                    report_lib.passed(count, "read", item.size, outcome.size)
                    if not stages.count_filter_stages(count, outcome):
                        continue
                    if config.exact_dedup.enabled and exact.is_duplicate(outcome.digest):
                        stages.count_dedup_and_pii(count, outcome.size, 0, {}, "exact")
                        continue
                    if config.near_dedup.enabled:
                        near.add(item.doc_id, outcome.band_keys, outcome.signature)
                    kept = documents.KeptFile(item.doc_id, item.group, outcome.record, outcome.redacted_size, outcome.imports, outcome.tokens)
                    spill.append((kept, outcome.size, outcome.pii_counts), outcome.redacted_size)
                    spilled.append((item.doc_id, outcome.size, documents.group_key(kept, config.repo.enabled)))
                progress.maybe_log()
            for indices in _decide(spilled, near, config.near_dedup.enabled, count):
                files = []
                for kept, size, pii_counts in spill.read(indices):
                    stages.count_dedup_and_pii(count, size, kept.redacted_size, pii_counts, None)
                    files.append(kept)
                for record in documents.documents(files, config.repo.enabled, tokenizer, count):
                    documents.count_output(count, record, writer.write(record))
                progress.maybe_log()
            shard_paths = writer.close()
    finally:
        spill.close()
    progress.log()
    seconds = time.perf_counter() - started
    result = make_report(counts, config, input_paths, output_dir, [os.path.basename(path) for path in shard_paths])
    result.update(workers=workers, seconds=round(seconds, 3), input_megabytes_per_second=_rate(counts, seconds))
    result["config"] = config.to_dict()
    write_json(os.path.join(output_dir, "report.json"), result)
    return result


def _decide(spilled: list[tuple[int, int, str]], near: dedup.NearDuplicateGraph, near_enabled: bool, count: report_lib.Count) -> list[list[int]]:
    """Counts near duplicates; returns the spill indices of the kept files per group key, the
    groups ordered by their first file."""
    groups: dict[str, list[int]] = {}
    representatives: set[int] = set()
    for spill_index, (doc_id, size, key) in enumerate(spilled):
        representative = near.representative(doc_id) if near_enabled else doc_id
        if representative != doc_id:
            stages.count_dedup_and_pii(count, size, 0, {}, "near")
            representatives.add(representative)
        else:
            groups.setdefault(key, []).append(spill_index)
    count("duplicates/near_clusters", len(representatives))
    return sorted(groups.values(), key=lambda indices: spilled[indices[0]][0])


class _Progress:
    def __init__(self, counts: collections.Counter[str], writer: shards.ShardWriter, started: float, interval: float):
        self.counts, self.writer, self.started, self.interval = counts, writer, started, interval
        self.next = started + interval

    def maybe_log(self) -> None:
        if time.perf_counter() >= self.next:
            self.log()
            self.next = time.perf_counter() + self.interval

    def log(self) -> None:
        megabytes = self.counts["stage/read/bytes_in"] / 1e6
        seconds = time.perf_counter() - self.started
        logging.info(
            "prepare: %d files read (%.1f MB, %.2f MB/s), %d kept, %d records written (%.1f MB)",
            self.counts["stage/read/documents_in"], megabytes, megabytes / seconds, self.counts["stage/pii/documents_out"],
            self.writer.num_records, self.writer.num_bytes / 1e6,
        )


def _rate(counts: collections.abc.Mapping[str, int], seconds: float) -> float | None:
    return round(counts.get("stage/read/bytes_in", 0) / 1e6 / seconds, 3) if seconds > 0 else None


def make_report(
    counts: collections.abc.Mapping[str, int], config: ml_collections.ConfigDict, input_paths: Sequence[str], output_dir: str, shard_names: list[str]
) -> dict[str, Any]:
    """The report of a run from its named counts (`report`), whichever engine counted them."""
    bands, rows = stages.lsh_shape(config.near_dedup)
    summary = report_lib.summary(
        counts,
        config_lib.split_list(config.pii.kinds) if config.pii.enabled else None,
        config.decontam.action if config.decontam.enabled else "disabled",
        bands,
        rows,
    )
    summary["output"]["shards"] = shard_names
    return {"inputs": list(input_paths), "output_dir": output_dir, **summary}


def write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2, sort_keys=False)
        file.write("\n")
