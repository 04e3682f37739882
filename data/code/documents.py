"""Output documents from the kept files: repository documents per group, or the files themselves.

The kept files of one input group (a repository directory of a tree; the records of one
JSONL/Parquet file with the same "repo" and a "path") become repository documents in dependency
order (`repo`); the local driver and the Beam pipeline both hand each group here whole, in input
order, so the documents do not depend on how the input was split or shuffled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from data.code import repo
from data.code import report as report_lib


@dataclasses.dataclass
class KeptFile:
    """What the repository stage needs of a file that survived every earlier stage.

    Attributes:
      doc_id: position in the input order (`inputs.document_id`).
      group: its input group, or None.
      record: the curated record (language set, text redacted, maybe "contaminated").
      redacted_size: UTF-8 bytes of the text after PII redaction.
      imports: parsed Python imports (repository files only).
      tokens: `encode(repo.file_piece(path, text))`, with a tokenizer.
    """

    doc_id: int
    group: str | None
    record: dict[str, Any]
    redacted_size: int
    imports: list[repo.Import] | None = None
    tokens: list[int] | None = None


def group_key(file: KeptFile, repository_documents: bool) -> str:
    """Files with equal keys are assembled together; a stand-alone file gets a key of its own."""
    if repository_documents and file.group is not None and file.record.get("path"):
        return file.group
    return f"#{file.doc_id}"


def documents(files: Sequence[KeptFile], repository_documents: bool, tokenizer: Any | None, count: report_lib.Count) -> list[dict[str, Any]]:
    """The output records of the kept files of one group key, in output order.

    Files are taken in input order; a path seen again in the group starts a new document of the
    same repository. Counts the repository stage. Outputs are ordered by the first file of their
    group, then by this list's order.
    """
    files = sorted(files, key=lambda file: file.doc_id)
    if len(files) == 1 and group_key(files[0], repository_documents).startswith("#"):
        [file] = files
        report_lib.passed(count, "repository", file.redacted_size)
        return [file.record]
    parts: list[list[KeptFile]] = [[]]
    paths: set[str] = set()
    for file in files:
        if file.record["path"] in paths:
            parts.append([])
            paths = set()
        parts[-1].append(file)
        paths.add(file.record["path"])
    return [_repository_document(part, tokenizer, count) for part in parts]


def _repository_document(files: Sequence[KeptFile], tokenizer: Any | None, count: report_lib.Count) -> dict[str, Any]:
    records = [file.record for file in files]
    imports = {file.record["path"]: file.imports for file in files if file.imports is not None}
    ordered = repo.order_files(records, imports)
    file_tokens = None
    if tokenizer is not None:
        tokens_by_path = {file.record["path"]: file.tokens for file in files}
        file_tokens = [tokens_by_path[record["path"]] for record in ordered]
    document = repo.repository_document(records[0]["repo"], ordered, tokenizer, file_tokens)
    contaminated = sorted({record["contaminated"] for record in records if record.get("contaminated")})
    if contaminated:
        document["contaminated"] = contaminated
    size_in = sum(file.redacted_size for file in files)
    report_lib.passed(count, "repository", size_in, len(document["text"].encode("utf-8", "surrogatepass")), len(files), 1)
    return document


def count_output(count: report_lib.Count, record: dict[str, Any], size: int) -> None:
    """Counts one written record of `size` serialised bytes."""
    count("output/records", 1)
    count("output/bytes", size)
    count(f"language/{record.get('lang') or 'unknown'}", 1)
