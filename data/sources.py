"""Random-access sources of code documents: JSONL, ArrayRecord and TFDS.

Every source is a grain `RandomAccessDataSource` whose records are dicts with a
"text" string and optional "path", "repo" and "lang" strings; other fields
(e.g. "tokens" of a curated repository document) pass through unchanged.
Malformed input raises `ValueError` (or `FileNotFoundError`) naming the file,
the line or record, and the offending field.

ArrayRecord records are UTF-8 JSON objects of the same shape, written by
`write_array_record` here and by the curation CLI (`data.prepare`).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from array_record.python import array_record_module

Record = dict[str, Any]
METADATA_FIELDS: tuple[str, ...] = ("path", "repo", "lang")
SOURCE_KINDS: tuple[str, ...] = ("jsonl", "arrayrecord", "tfds")
# group_size:1 makes every record independently seekable (what grain needs).
ARRAY_RECORD_WRITER_OPTIONS = "group_size:1"


def normalize_record(raw: Any, where: str, text_field: str = "text") -> Record:
    """Validates a raw record: "text" (read from `text_field`) and metadata as str.

    `bytes` values (as TFDS returns for text features) are decoded as UTF-8;
    absent (None) metadata is dropped; other fields are kept as they are.
    `where` locates the record in error messages, e.g. "data.jsonl:12".
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: record must be a JSON object, got {type(raw).__name__}")
    if text_field not in raw:
        raise ValueError(f"{where}: record has no {text_field!r} field (fields: {sorted(raw)})")
    record = {key: value for key, value in raw.items() if key not in (text_field, *METADATA_FIELDS)}
    record["text"] = _as_str(raw[text_field], where, text_field)
    for field in METADATA_FIELDS:
        value = raw.get(field)
        if value is not None:
            record[field] = _as_str(value, where, field)
    return record


def _as_str(value: Any, where: str, field: str) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: field {field!r} is not valid UTF-8: {error}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def parse_json_record(data: bytes | str, where: str, text_field: str = "text") -> Record:
    """Parses one JSON-object record (a JSONL line or an ArrayRecord record)."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: malformed JSON record: {error}") from None
    return normalize_record(raw, where, text_field)


def serialize_record(record: Mapping[str, str]) -> bytes:
    """The ArrayRecord encoding of a record: a UTF-8 JSON object."""
    return json.dumps(dict(record), ensure_ascii=False).encode("utf-8")


def write_array_record(path: str | os.PathLike[str], records: Iterable[Mapping[str, str]]) -> int:
    """Writes `records` to one ArrayRecord file; returns the number written."""
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_WRITER_OPTIONS)
    count = 0
    try:
        for count, record in enumerate(records, start=1):
            writer.write(serialize_record(normalize_record(record, f"{path}[record {count - 1}]")))
    finally:
        writer.close()
    return count


def expand_paths(spec: str | Sequence[str], field: str) -> list[str]:
    """Files named by a comma-separated list (or sequence) of paths/glob patterns.

    Each entry must match at least one file; the error names the config `field`.
    Matches of one pattern are sorted, so the order is deterministic.
    """
    patterns = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    patterns = [p for p in patterns if p]
    if not patterns:
        raise ValueError(f"{field}: no files given")
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{field}: no file matches {pattern!r}")
        paths.extend(matches)
    return paths


class JsonlSource(grain.sources.RandomAccessDataSource):
    """Records of JSONL files, one JSON object per non-blank line.

    Opening a file indexes its line offsets (one sequential read); records are
    parsed lazily on access, so a malformed line raises when it is read, naming
    `file:line`. Blank lines are not records. Thread-safe (positional reads).
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], text_field: str = "text"):
        self._paths = [os.fspath(p) for p in paths]
        self._text_field = text_field
        file_ids, starts, ends, line_numbers = [], [], [], []
        for file_id, path in enumerate(self._paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"JSONL file not found: {path}")
            offset = 0
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, start=1):
                    if line.strip():
                        file_ids.append(file_id)
                        starts.append(offset)
                        ends.append(offset + len(line))
                        line_numbers.append(line_number)
                    offset += len(line)
        self._file_ids = np.asarray(file_ids, np.int32)
        self._starts = np.asarray(starts, np.int64)
        self._ends = np.asarray(ends, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> Record:
        file_id = int(self._file_ids[index])
        start, end = int(self._starts[index]), int(self._ends[index])
        data = os.pread(self._fd(file_id), end - start, start)
        where = f"{self._paths[file_id]}:{self._line_numbers[index]}"
        return parse_json_record(data, where, self._text_field)

    def _fd(self, file_id: int) -> int:
        with self._lock:
            if file_id not in self._fds:
                self._fds[file_id] = os.open(self._paths[file_id], os.O_RDONLY)
            return self._fds[file_id]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self._paths}, records={len(self)})"


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """Records of ArrayRecord files holding UTF-8 JSON objects (`serialize_record`)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], text_field: str = "text"):
        self._paths = [os.fspath(p) for p in paths]
        self._text_field = text_field
        counts = []
        for path in self._paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ArrayRecord file not found: {path}")
            try:
                reader = array_record_module.ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()  # reports some corruption only here
            except Exception as error:  # the C++ reader raises plain RuntimeError/ValueError
                raise ValueError(f"{path}: not a readable ArrayRecord file: {error}") from None
        self._ends = list(np.cumsum(counts, dtype=np.int64).tolist())
        # "[0:n]" read instructions spare grain from reopening every file to count records.
        self._source = grain.sources.ArrayRecordDataSource(
            [f"{path}[0:{n}]" for path, n in zip(self._paths, counts)]
        ) if self._paths else None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> Record:
        return parse_json_record(self._source[index], self._where(index), self._text_field)

    def _where(self, index: int) -> str:
        file_id = bisect.bisect_right(self._ends, index)
        first = self._ends[file_id - 1] if file_id else 0
        return f"{self._paths[file_id]}[record {index - first}]"

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self._paths}, records={len(self)})"


class TfdsSource(grain.sources.RandomAccessDataSource):
    """A prepared TFDS dataset split read through `tfds.data_source` (no TensorFlow).

    Never downloads or prepares: the dataset must already be in `data_dir`.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, text_field: str = "text"):
        import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import, only needed here)

        self._name, self._split, self._text_field = name, split, text_field
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:  # tfds raises many types for missing/unprepared datasets
            raise FileNotFoundError(
                f"TFDS dataset {name!r} split {split!r} not readable from data_dir={data_dir!r}: {error}"
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        where = f"tfds:{self._name}/{self._split}[record {index}]"
        return normalize_record(self._source[index], where, self._text_field)

    def __repr__(self) -> str:
        return f"TfdsSource({self._name!r}, split={self._split!r}, records={len(self)})"


def open_source(
    kind: str,
    spec: str,
    *,
    field: str,
    text_field: str = "text",
    tfds_name: str | None = None,
    tfds_data_dir: str | None = None,
) -> grain.sources.RandomAccessDataSource:
    """Opens one source split and checks that it is not empty.

    Args:
      kind: one of `SOURCE_KINDS`.
      spec: for "jsonl"/"arrayrecord", comma-separated files or glob patterns;
        for "tfds", a TFDS split expression such as "train" or "train[:10%]".
      field: the config field `spec` came from, named in errors.
      text_field: name of the text field in raw records.
      tfds_name: TFDS dataset name, optionally with config/version (for "tfds").
      tfds_data_dir: TFDS data directory (for "tfds").
    """
    if kind == "jsonl":
        source = JsonlSource(expand_paths(spec, field), text_field)
    elif kind == "arrayrecord":
        source = ArrayRecordSource(expand_paths(spec, field), text_field)
    elif kind == "tfds":
        if not tfds_name:
            raise ValueError(f"{field}: a tfds source needs a dataset name (tfds_name)")
        source = TfdsSource(tfds_name, spec, tfds_data_dir, text_field)
    else:
        raise ValueError(f"{field}: unknown source kind {kind!r} (expected one of {SOURCE_KINDS})")
    if len(source) == 0:
        raise ValueError(f"{field}: source {spec!r} holds no records")
    return source


def iter_records(source: grain.sources.RandomAccessDataSource) -> Iterable[Record]:
    """All records of `source` in order (for tools that read a whole source)."""
    return (source[i] for i in range(len(source)))

