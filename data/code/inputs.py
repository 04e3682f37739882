"""Readers of curation inputs: JSONL(.gz) and Parquet files of records, directory trees of repositories.

Each input document becomes an `InputFile` with a `doc_id`, its position in the input order
(`document_id(input index, position in that input)`), which the local driver and the Beam
pipeline compute alike and which decides which copy deduplication keeps. Readers never raise on
bad content: an undecodable, malformed or incomplete record, an unreadable file or a file cut
short comes out as an `InputFile` without a record and with a drop reason, so it is counted.

The readers take open binary streams, so the local driver (`read_inputs`, local paths) and the
Beam pipeline (Beam filesystems: gs://, s3://, hdfs://, local) share them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

_FIELDS = ("text", "path", "repo", "lang")
_BINARY_SNIFF_BYTES = 8192
_POSITION_BITS = 40  # positions inside one input: line numbers, row numbers, files of a tree
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def document_id(input_index: int, position: int) -> int:
    """The document's place in the input order, as one int (inputs first, then positions)."""
    return (input_index << _POSITION_BITS) | position


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input document before curation.

    Attributes:
      record: {"text", and optionally "path", "repo", "lang"}; None when unreadable.
      group: the kept files of one group form repository documents (`documents`); None for
        stand-alone documents.
      size: bytes read from the input for this document.
      drop_reason: why `record` is None ('binary', 'not_utf8', 'too_large', 'invalid_json',
        'not_object', 'missing_text', 'bad_field', 'unreadable').
      doc_id: `document_id` of the document.
    """

    record: dict[str, Any] | None
    group: str | None
    size: int
    drop_reason: str | None = None
    doc_id: int = 0


@dataclasses.dataclass(frozen=True)
class Input:
    """One input after expansion: `kind` is 'tree', 'jsonl' or 'parquet'; `index` its place."""

    index: int
    path: str
    kind: str


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson"))


def file_kind(path: str) -> str:
    """'parquet' for *.parquet, else 'jsonl' (JSON lines, gzip-compressed when *.gz)."""
    return "parquet" if path.endswith(".parquet") else "jsonl"


def expand_inputs(paths: Sequence[str], match: Any = None, is_dir: Any = os.path.isdir, exists: Any = os.path.isfile) -> list[Input]:
    """Directories, files and glob patterns (expanded, sorted) as numbered `Input`s.

    `match(pattern) -> paths`, `is_dir` and `exists` default to the local filesystem; the Beam
    pipeline passes Beam filesystem versions for object-store paths.
    """
    match = match or (lambda pattern: sorted(glob.glob(pattern)))
    expanded: list[tuple[str, str]] = []
    for path in paths:
        if any(char in path for char in "*?["):
            found = sorted(match(path))
            if not found:
                raise ValueError(f"{path}: no file matches")
            expanded += [(found_path, file_kind(found_path)) for found_path in found]
        elif is_dir(path):
            expanded.append((path, "tree"))
        elif exists(path):
            expanded.append((path, file_kind(path)))
        else:
            raise ValueError(f"{path}: no such file or directory")
    return [Input(index, path, kind) for index, (path, kind) in enumerate(expanded)]


def parse_fields(spec: str) -> dict[str, str]:
    """'text=content,repo=repo_name' -> record field -> input column, for text/path/repo/lang."""
    fields = dict(zip(_FIELDS, _FIELDS))
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, column = item.partition("=")
        if name.strip() not in fields or not column.strip():
            raise ValueError(f"bad field mapping {item!r}: expected <{'|'.join(_FIELDS)}>=<column>")
        fields[name.strip()] = column.strip()
    return fields


def _record(raw: Mapping[str, Any], fields: Mapping[str, str], max_bytes: int) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, drop reason) of one parsed input row."""
    columns = set(fields.values())
    record = {key: value for key, value in raw.items() if key not in columns}
    for name, column in fields.items():
        value = raw.get(column)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return None, "not_utf8"
        if value is None:
            continue
        if not isinstance(value, str):
            return None, "bad_field"
        record[name] = value
    if "text" not in record:
        return None, "missing_text"
    if len(record["text"].encode("utf-8", "surrogatepass")) > max_bytes:
        return None, "too_large"
    return record, None


def _input_file(record: dict[str, Any] | None, reason: str | None, path: str, size: int, doc_id: int) -> InputFile:
    group = f"{path}\0{record['repo']}" if record is not None and record.get("repo") and record.get("path") else None
    return InputFile(record, group, size, reason, doc_id)


def jsonl_records(stream: Iterable[bytes], path: str, input_index: int, fields: Mapping[str, str], max_bytes: int) -> Iterator[InputFile]:
    """Records of a JSONL stream (one JSON object per line; blank lines skipped). Records with
    the same "repo" (and a "path") in one file form one repository."""
    number = 0
    try:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            doc_id = document_id(input_index, number)
            try:
                raw = json.loads(line)
            except UnicodeDecodeError:
                yield InputFile(None, None, len(line), "not_utf8", doc_id)
                continue
            except ValueError:
                yield InputFile(None, None, len(line), "invalid_json", doc_id)
                continue
            if not isinstance(raw, dict):
                yield InputFile(None, None, len(line), "not_object", doc_id)
                continue
            record, reason = _record(raw, fields, max_bytes)
            yield _input_file(record, reason, path, len(line), doc_id)
    except _READ_ERRORS:  # a truncated gzip stream, a read error: the rest of the file is lost
        yield InputFile(None, None, 0, "unreadable", document_id(input_index, number + 1))


def parquet_records(stream: IO[bytes], path: str, input_index: int, fields: Mapping[str, str], max_bytes: int) -> Iterator[InputFile]:
    """Rows of a Parquet file (only the mapped columns are read); size: the text's UTF-8 bytes."""
    import pyarrow  # noqa: PLC0415  (only Parquet inputs need it)
    import pyarrow.parquet as pq  # noqa: PLC0415

    number = 0
    try:
        parquet = pq.ParquetFile(stream)
        columns = [column for column in dict.fromkeys(fields.values()) if column in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):
            for raw in batch.to_pylist():
                number += 1
                record, reason = _record(raw, fields, max_bytes)
                text = raw.get(fields["text"])
                size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text) if isinstance(text, bytes) else 0
                yield _input_file(record, reason, path, size, document_id(input_index, number))
    except (*_READ_ERRORS, pyarrow.ArrowException):
        yield InputFile(None, None, 0, "unreadable", document_id(input_index, number + 1))


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _walk_files(directory: str, exclude: Sequence[str]) -> Iterator[str]:
    """Regular files under `directory` (symlinks not followed), sorted, as absolute paths."""
    with os.scandir(directory) as entries:
        entries = sorted(entries, key=lambda entry: entry.name)
    for entry in entries:
        if _excluded(entry.name, exclude):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_files(entry.path, exclude)
        elif entry.is_file(follow_symlinks=False):
            yield entry.path


def read_source(path: str, max_bytes: int) -> tuple[str | None, int, str | None]:
    """(text, size, drop reason) of one source file."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            return None, size, "too_large"
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None, 0, "unreadable"
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        return None, size, "binary"
    try:
        return data.decode("utf-8"), size, None
    except UnicodeDecodeError:
        return None, size, "not_utf8"


def repositories(root: str, exclude: Sequence[str], single_repo: bool) -> list[tuple[str, str, bool]]:
    """(repository name, directory, recursive) for a directory tree of repositories.

    Each top-level subdirectory is a repository named after it; files directly under `root`
    form one more repository named after `root`. With `single_repo`, the tree is one repository.
    """
    name = os.path.basename(os.path.normpath(os.path.abspath(root)))
    if single_repo:
        return [(name, root, True)]
    with os.scandir(root) as entries:
        subdirectories = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and not _excluded(e.name, exclude))
    return [(name, root, False)] + [(sub, os.path.join(root, sub), True) for sub in subdirectories]


@dataclasses.dataclass(frozen=True)
class TreeFile:
    """A file of a repository tree, listed but not read: "path" relative to its repository."""

    path: str
    relative: str
    repo: str
    group: str
    doc_id: int


def list_repository_tree(root: str, input_index: int, exclude: Sequence[str], single_repo: bool) -> Iterator[TreeFile]:
    """Files of the repositories under `root`, repository by repository, in path order."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a directory")
    position = 0
    for repo, directory, recursive in repositories(root, exclude, single_repo):
        if recursive:
            paths = _walk_files(directory, exclude)
        else:
            with os.scandir(directory) as entries:
                paths = sorted(e.path for e in entries if e.is_file(follow_symlinks=False) and not _excluded(e.name, exclude))
        group = f"{os.path.abspath(directory)}\0{repo}"
        for path in paths:
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            yield TreeFile(path, relative, repo, group, document_id(input_index, position))
            position += 1


def read_tree_file(file: TreeFile, max_file_bytes: int) -> InputFile:
    text, size, reason = read_source(file.path, max_file_bytes)
    record = None if text is None else {"text": text, "path": file.relative, "repo": file.repo}
    return InputFile(record, file.group, size, reason, file.doc_id)


def open_local(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def read_input(item: Input, stream: IO[bytes], fields: Mapping[str, str], max_file_bytes: int) -> Iterator[InputFile]:
    """The records of one JSONL or Parquet input from an open stream."""
    reader = parquet_records if item.kind == "parquet" else jsonl_records
    yield from reader(stream, item.path, item.index, fields, max_file_bytes)


def read_inputs(
    paths: Sequence[str], exclude: Sequence[str], single_repo: bool, max_file_bytes: int, fields: Mapping[str, str] | None = None
) -> Iterator[InputFile]:
    """All local inputs in order: directories as repository trees, *.parquet as Parquet, other
    files as JSONL(.gz); glob patterns expand to their sorted matches."""
    fields = fields or parse_fields("")
    for item in expand_inputs(paths):
        if item.kind == "tree":
            for file in list_repository_tree(item.path, item.index, exclude, single_repo):
                yield read_tree_file(file, max_file_bytes)
            continue
        try:
            stream = open_local(item.path)
        except OSError:
            yield InputFile(None, None, 0, "unreadable", document_id(item.index, 0))
            continue
        with stream:
            yield from read_input(item, stream, fields, max_file_bytes)
