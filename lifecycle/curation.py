"""The curation stage's input: the embedded corpus's train split as `data.prepare` JSONL records.

The held-out files stay out of curation (they are every stage's loss target, and curation must not
see them). Each top-level standard-library package is one repository (`email/...` -> "stdlib/email"),
and a single-file module is its own, so curation builds repository documents (files in dependency
order) as it would for a crawled code host.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data.corpus import arrayrecord_pattern
from data.sources import open_source


def repository_of(path: str) -> str:
    """'email/mime/text.py' -> 'stdlib/email'; 'json/__init__.py' -> 'stdlib/json'; 'ast.py' -> 'stdlib/ast'."""
    head, sep, _ = path.partition("/")
    return f"stdlib/{head if sep else Path(path).stem}"


def write_curation_input(corpus_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> int:
    """Writes the train split of the corpus in `corpus_dir` as JSONL; returns the number of files."""
    source = open_source("arrayrecord", arrayrecord_pattern(corpus_dir, "train"), field="lifecycle corpus (train)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(len(source)):
            record = source[i]
            f.write(json.dumps({"text": record["text"], "path": record["path"], "repo": repository_of(record["path"]),
                                "lang": record.get("lang", "python")}) + "\n")
    os.replace(tmp, out_path)
    return len(source)
