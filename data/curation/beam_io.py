"""Inputs and outputs of the Beam curation pipeline, through Beam filesystems (local paths, gs://,
s3://, hdfs://, ...), and the named counts (`data.code.report`) as Beam metrics."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from array_record.python import array_record_module

from data.code import inputs, shards

NAMESPACE = "codelm.curation"


class Counter:
    """`report.Count` on Beam metrics counters (one per name, created on first use)."""

    def __init__(self) -> None:
        self._counters: dict[str, Any] = {}

    def __call__(self, name: str, value: int) -> None:
        if value:
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
            counter.inc(int(value))


def counts_of(result: Any) -> dict[str, int]:
    """Named counts of a finished pipeline: committed values, else attempted (runners differ)."""
    counts: dict[str, int] = {}
    for metric in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        try:
            value = metric.committed
        except Exception:  # noqa: BLE001  (a runner without committed metrics raises here)
            value = None
        value = metric.attempted if value is None else value
        counts[metric.key.metric.name] = counts.get(metric.key.metric.name, 0) + int(value or 0)
    return counts


def _is_local_dir(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def expand(paths: Sequence[str]) -> list[inputs.Input]:
    """`inputs.expand_inputs` with Beam filesystems: patterns and files on any of them,
    directory trees on the local filesystem (or one mounted on every worker)."""
    match = lambda pattern: [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    return inputs.expand_inputs(paths, match=match, is_dir=_is_local_dir, exists=FileSystems.exists)


class ReadRecords(beam.DoFn):
    """An `inputs.Input` (JSONL or Parquet file) -> its `inputs.InputFile`s, read sequentially;
    files are read in parallel."""

    def __init__(self, fields: Mapping[str, str], max_file_bytes: int):
        self.fields = dict(fields)
        self.max_file_bytes = max_file_bytes

    def process(self, item: inputs.Input) -> Iterator[inputs.InputFile]:
        compression = CompressionTypes.UNCOMPRESSED if item.kind == "parquet" else CompressionTypes.AUTO
        try:
            stream = FileSystems.open(item.path, compression_type=compression)
        except (OSError, ValueError, zlib.error):
            yield inputs.InputFile(None, None, 0, "unreadable", inputs.document_id(item.index, 0))
            return
        with stream:
            lines = stream if item.kind == "parquet" else iter(stream.readline, b"")
            yield from inputs.read_input(item, lines, self.fields, self.max_file_bytes)


def shard_count(records: int, size: int, records_per_shard: int, max_shard_bytes: int) -> int:
    return max(1, math.ceil(records / records_per_shard), math.ceil(size / max_shard_bytes))


def shard_of(order: tuple[int, int], num_shards: int) -> int:
    """A deterministic shard for an output record's order key."""
    return zlib.crc32(f"{order[0]}:{order[1]}".encode()) % num_shards


class WriteShard(beam.DoFn):
    """(shard, [(order key, JSON bytes)]) -> `{prefix}-SSSSS-of-NNNNN.array_record` in `output_dir`,
    records sorted by order key, written like `shards.ShardWriter` (group_size:1), through a
    local temporary file (ArrayRecord writes local files)."""

    def __init__(self, output_dir: str, prefix: str):
        self.output_dir = output_dir
        self.prefix = prefix

    def process(self, shard_records: tuple[int, Iterable[Any]], num_shards: int) -> Iterator[str]:
        shard, records = shard_records
        records = sorted((record for record in records if record is not None), key=lambda record: record[0])
        name = f"{self.prefix}-{shard:05d}-of-{num_shards:05d}.array_record"
        with tempfile.TemporaryDirectory(prefix="codelm-shard-") as directory:
            local = os.path.join(directory, name)
            writer = array_record_module.ArrayRecordWriter(local, shards.WRITER_OPTIONS)
            for _, data in records:
                writer.write(data)
            writer.close()
            with open(local, "rb") as source, FileSystems.create(FileSystems.join(self.output_dir, name)) as target:
                shutil.copyfileobj(source, target, 1 << 20)
        yield name


def existing_shards(output_dir: str, prefix: str) -> list[str]:
    pattern = FileSystems.join(output_dir, f"{prefix}-*.array_record*")
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def write_json(path: str, value: Mapping[str, Any]) -> None:
    with FileSystems.create(path) as file:
        file.write((json.dumps(value, indent=2) + "\n").encode("utf-8"))
