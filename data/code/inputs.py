"""Readers of curation inputs: JSONL files of records and directory trees of repositories.

Both yield `InputFile`s in a deterministic order, one at a time (inputs never sit in memory
whole). Malformed JSONL is an error naming the file and line; unreadable files in a directory
tree (binary, not UTF-8, too large) are normal there and come out as drops with a reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Iterator, Sequence
from typing import Any

from data import jsonl

_OPTIONAL_STRING_FIELDS = ("path", "repo", "lang")
_BINARY_SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input document before curation.

    Attributes:
      record: {"text", and optionally "path", "repo", "lang"}; None when unreadable.
      group: files with the same non-None group, consecutive in the stream, form one
        repository document; None for stand-alone documents.
      size: bytes read from the input for this document.
      drop_reason: why `record` is None ('binary', 'not_utf8', 'too_large').
    """

    record: dict[str, Any] | None
    group: str | None
    size: int
    drop_reason: str | None = None


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson"))


def read_jsonl_files(path: str) -> Iterator[InputFile]:
    """Records of a JSONL(.gz) file: objects with a string "text" and optional string "path",
    "repo", "lang" (other fields are carried along). Consecutive records with the same "repo"
    (and a "path") form one repository; sort a file by repository to get whole-repository
    documents."""
    for line in jsonl.read_jsonl(path):
        record = line.record
        if not isinstance(record.get("text"), str):
            raise jsonl.JSONLError(f"{line.where}: field 'text' must be a string, got {type(record.get('text')).__name__}")
        for field in _OPTIONAL_STRING_FIELDS:
            if field in record and not isinstance(record[field], str):
                raise jsonl.JSONLError(f"{line.where}: field {field!r} must be a string, got {type(record[field]).__name__}")
        group = f"{path}\0{record['repo']}" if record.get("repo") and record.get("path") else None
        yield InputFile(record, group, line.nbytes)


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


def _read_source(path: str, max_bytes: int) -> tuple[str | None, int, str | None]:
    """(text, size, drop reason) of one file."""
    size = os.path.getsize(path)
    if size > max_bytes:
        return None, size, "too_large"
    with open(path, "rb") as file:
        data = file.read()
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


def read_repository_tree(root: str, exclude: Sequence[str], single_repo: bool, max_file_bytes: int) -> Iterator[InputFile]:
    """Files of the repositories under `root`, repository by repository, with "path" relative to
    the repository directory ('/'-separated) and "repo" set."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a directory")
    for repo, directory, recursive in repositories(root, exclude, single_repo):
        if recursive:
            paths = _walk_files(directory, exclude)
        else:
            with os.scandir(directory) as entries:
                paths = sorted(e.path for e in entries if e.is_file(follow_symlinks=False) and not _excluded(e.name, exclude))
        group = f"{os.path.abspath(directory)}\0{repo}"
        for path in paths:
            text, size, reason = _read_source(path, max_file_bytes)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            record = None if text is None else {"text": text, "path": relative, "repo": repo}
            yield InputFile(record, group, size, reason)


def read_inputs(paths: Sequence[str], exclude: Sequence[str], single_repo: bool, max_file_bytes: int) -> Iterator[InputFile]:
    """All inputs in order: directories as repository trees, other paths as JSONL."""
    for path in paths:
        if os.path.isdir(path):
            yield from read_repository_tree(path, exclude, single_repo, max_file_bytes)
        elif os.path.isfile(path):
            yield from read_jsonl_files(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
