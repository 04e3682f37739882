"""Reading JSONL(.gz) files with errors that name the file and the line.

    for line in read_jsonl("problems.jsonl"):
        line.record["task_id"], line.where   # where == "problems.jsonl:12"
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Iterator
from typing import Any


class JSONLError(ValueError):
    """A JSONL file cannot be read; the message starts with "<file>:<line>" (or "<file>")."""


@dataclasses.dataclass(frozen=True)
class Line:
    where: str  # "<file>:<line number>", for error messages about this record
    number: int  # 1-based
    record: Any  # a dict unless read with objects=False
    nbytes: int  # size of the line in the file


def read_jsonl(path: str | os.PathLike[str], *, objects: bool = True) -> Iterator[Line]:
    """The non-blank lines of a JSONL file (gzip-compressed when it ends in .gz), parsed.

    objects: each line must hold a JSON object (else JSONLError); False accepts any JSON value.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise JSONLError(f"{where}: invalid JSON: {e}") from None
                if objects and not isinstance(record, dict):
                    raise JSONLError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield Line(where, number, record, len(line))
    except OSError as e:
        raise JSONLError(f"{path}: cannot read: {e.strerror or e}") from None
