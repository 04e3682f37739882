"""Streaming ArrayRecord shard writer: one UTF-8 JSON object per record.

Shards fill up to a record count or byte size, then the next one starts, so output streams
with bounded memory. Their final names, ``{prefix}-{index:05d}-of-{count:05d}.array_record``,
are given on `close` once the count is known. Files are written with ``group_size:1`` so that
grain can read any record without decompressing its neighbours.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

from array_record.python import array_record_module

WRITER_OPTIONS = "group_size:1"


def serialize(record: Mapping[str, Any]) -> bytes:
    """A record as it is stored: UTF-8 JSON."""
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")


class ShardWriter:
    def __init__(self, output_dir: str, prefix: str, records_per_shard: int, max_shard_bytes: int):
        existing = glob.glob(os.path.join(output_dir, f"{glob.escape(prefix)}-*.array_record*"))
        if existing:
            raise FileExistsError(f"{output_dir} already holds shards named {prefix}-*.array_record; remove them or pick another output directory")
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.prefix = prefix
        self.records_per_shard = records_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.num_records = 0
        self.num_bytes = 0
        self._paths: list[str] = []
        self._writer: Any = None
        self._shard_records = 0
        self._shard_bytes = 0

    def write(self, record: Mapping[str, Any]) -> int:
        """Appends one record; returns its serialised size in bytes."""
        return self.write_serialized(serialize(record))

    def write_serialized(self, data: bytes) -> int:
        """Appends one record already `serialize`d; returns its size in bytes."""
        if self._writer is None or self._shard_records >= self.records_per_shard or (
            self._shard_records and self._shard_bytes + len(data) > self.max_shard_bytes
        ):
            self._start_shard()
        self._writer.write(data)
        self._shard_records += 1
        self._shard_bytes += len(data)
        self.num_records += 1
        self.num_bytes += len(data)
        return len(data)

    def _start_shard(self) -> None:
        self._close_writer()
        path = os.path.join(self.output_dir, f"{self.prefix}-{len(self._paths):05d}.array_record.partial")
        self._writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
        self._paths.append(path)
        self._shard_records = self._shard_bytes = 0

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[str]:
        """Finishes the last shard and gives all shards their final names (returned, in order)."""
        self._close_writer()
        final = []
        for index, path in enumerate(self._paths):
            name = os.path.join(self.output_dir, f"{self.prefix}-{index:05d}-of-{len(self._paths):05d}.array_record")
            os.replace(path, name)
            final.append(name)
        self._paths = []
        return final

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close_writer()


def read_shards(paths: list[str]) -> list[dict[str, Any]]:
    """All records of the given shards, in order (for tests and inspection; loads everything)."""
    records = []
    for path in paths:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            records.extend(json.loads(data) for data in reader.read_all())
        finally:
            reader.close()
    return records
