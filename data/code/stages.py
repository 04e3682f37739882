"""The per-file curation stages, as pure functions, and their composition for worker processes.

Stage order (the order the report counts them in):
  read -> language -> quality -> decontamination -> exact_dedup -> near_dedup -> pii -> repository

Every stage here is a pure function of a record and the configuration, so a distributed engine
(an Apache Beam ParDo, a TFDS builder) can run them unchanged. The two deduplication stages only
*compute* their keys here (content digest, MinHash signature, LSH band keys); the keep/drop
decision needs state across documents and is taken by `dedup` (single machine) or a group-by
(distributed). `pii` redaction runs here too, after the keys are taken from the original text,
so redaction cannot make duplicates look distinct.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data.code import config as config_lib
from data.code import decontam, dedup, filters, hashing, languages, minhash, pii, repo
from data.code import report as report_lib

STAGES = report_lib.STAGES


def language_stage(record: Mapping[str, Any], allowed: frozenset[str], keep_unknown: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(record with "lang", None) when kept; (None, 'unknown' | 'excluded') when dropped.

    A record's own "lang" wins over detection from its "path". An empty `allowed` allows all.
    """
    language = record.get("lang") or languages.detect_language(record.get("path", ""))
    if language is None:
        return (dict(record), None) if keep_unknown else (None, "unknown")
    if allowed and language not in allowed:
        return None, "excluded"
    return {**record, "lang": language}, None


def quality_stage(text: str, thresholds: filters.QualityThresholds) -> str | None:
    """The failed filter's name, or None (see `filters.quality_issue`)."""
    return filters.quality_issue(text, thresholds)


def decontamination_stage(tokens: hashing.HashedSequences, index: decontam.ContaminationIndex) -> list[str | None]:
    """Per document (given by its word-token hashes), the evaluation problem it shares the most
    n-grams with, or None."""
    return index.find_in_tokens(tokens)


def exact_dedup_key(text: str) -> bytes:
    """The content digest exact deduplication compares."""
    return dedup.content_hash(text)


def near_dedup_keys(tokens: hashing.HashedSequences, hasher: minhash.MinHasher, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, num_perm] uint32 MinHash signatures, [N, bands] uint64 LSH bucket keys) of N
    documents given by their word-token hashes."""
    signatures = hasher.signatures_of_tokens(tokens)
    return signatures, minhash.band_keys(signatures, bands, rows)


def pii_stage(text: str, kinds: Sequence[str]) -> tuple[str, dict[str, int]]:
    """(redacted text, replacements per kind)."""
    return pii.redact_pii(text, kinds)


@dataclasses.dataclass
class FileOutcome:
    """What the worker stages made of one file.

    Attributes:
      record: the curated record (language set, text redacted, maybe "contaminated"), or None.
      dropped_by: the stage that dropped the file ('language', 'quality', 'decontamination').
      reason: that stage's finer reason (e.g. 'max_line_length', 'HumanEval/12').
      size: UTF-8 bytes of the text as read; redacted_size: after PII redaction.
      digest / signature / band_keys: deduplication keys of the original text.
      pii_counts: redactions per kind.
      contamination: the matched evaluation problem (also when only flagged).
      imports: parsed Python imports, for ordering repository documents.
      tokens: `encode(repo.file_piece(path, text))`, when a tokenizer is configured.
    """

    record: dict[str, Any] | None
    dropped_by: str | None = None
    reason: str | None = None
    size: int = 0
    redacted_size: int = 0
    digest: bytes | None = None
    signature: np.ndarray | None = None
    band_keys: np.ndarray | None = None
    pii_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    contamination: str | None = None
    imports: list[repo.Import] | None = None
    tokens: list[int] | None = None


def lsh_shape(near: Mapping[str, Any]) -> tuple[int, int]:
    """(bands, rows) of a `near_dedup` config section."""
    if near["bands"]:
        return near["bands"], near["rows"]
    return minhash.lsh_parameters(near["threshold"], near["num_perm"])


class FileStages:
    """language -> quality -> decontamination -> dedup keys -> pii -> repository extras, on a batch.

    Picklable (plain configuration, the contamination index, an optional tokenizer), so it is
    sent to each worker process once, at start-up.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        index: decontam.ContaminationIndex | None,
        tokenizer: Any | None = None,
    ):
        self.config = config
        self.index = index
        self.tokenizer = tokenizer
        self.allowed = frozenset(config_lib.split_list(config["language"]["languages"]))
        quality = config["quality"]
        self.thresholds = filters.QualityThresholds(
            max_line_length=quality["max_line_length"],
            max_mean_line_length=quality["max_mean_line_length"],
            min_alphanumeric_fraction=quality["min_alphanumeric_fraction"],
            autogenerated_markers=tuple(config_lib.split_list(quality["autogenerated_markers"])),
            autogenerated_scan_lines=quality["autogenerated_scan_lines"],
        )
        near = config["near_dedup"]
        self.hasher = minhash.MinHasher(near["num_perm"], near["ngram"], near["seed"])
        self.bands, self.rows = lsh_shape(near)
        self.pii_kinds = config_lib.split_list(config["pii"]["kinds"])

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> list[FileOutcome]:
        outcomes = [self._filter(record) for record in records]
        kept = [outcome for outcome in outcomes if outcome.record is not None]
        near_enabled = self.config["near_dedup"]["enabled"]
        if kept and (self.index is not None or near_enabled):
            # Word tokens are hashed once for both decontamination and MinHash.
            tokens = hashing.word_token_hashes([outcome.record["text"] for outcome in kept])
            if self.index is not None:
                kept, tokens = self._decontaminate(kept, tokens)
            if near_enabled and kept:
                signatures, keys = near_dedup_keys(tokens, self.hasher, self.bands, self.rows)
                for outcome, signature, key in zip(kept, signatures, keys):
                    outcome.signature, outcome.band_keys = signature, key
        for outcome in kept:
            self._finish(outcome)
        return outcomes

    def _decontaminate(
        self, kept: list[FileOutcome], tokens: hashing.HashedSequences
    ) -> tuple[list[FileOutcome], hashing.HashedSequences]:
        """Drops or flags contaminated files; returns the survivors and their tokens."""
        drop = self.config["decontam"]["action"] == "drop"
        for outcome, match in zip(kept, decontamination_stage(tokens, self.index)):
            outcome.contamination = match
            if match and drop:
                outcome.record, outcome.dropped_by, outcome.reason = None, "decontamination", match
            elif match:
                outcome.record["contaminated"] = match
        survivors = [i for i, outcome in enumerate(kept) if outcome.record is not None]
        return [kept[i] for i in survivors], tokens.select(survivors)

    def _filter(self, record: Mapping[str, Any]) -> FileOutcome:
        size = len(record["text"].encode("utf-8", "surrogatepass"))
        record, reason = language_stage(record, self.allowed, self.config["language"]["keep_unknown"])
        if record is None:
            return FileOutcome(None, "language", reason, size)
        if self.config["quality"]["enabled"]:
            reason = quality_stage(record["text"], self.thresholds)
            if reason is not None:
                return FileOutcome(None, "quality", reason, size)
        return FileOutcome(record, size=size)

    def _finish(self, outcome: FileOutcome) -> None:
        """Exact-dedup key (of the original text), PII redaction, repository extras."""
        record = outcome.record
        if self.config["exact_dedup"]["enabled"]:
            outcome.digest = exact_dedup_key(record["text"])
        if self.config["pii"]["enabled"]:
            record["text"], outcome.pii_counts = pii_stage(record["text"], self.pii_kinds)
            outcome.redacted_size = len(record["text"].encode("utf-8", "surrogatepass"))
        else:
            outcome.redacted_size = outcome.size
        if self.config["repo"]["enabled"] and record.get("repo") and record.get("path"):
            if repo.is_python(record["path"]):
                outcome.imports = repo.python_imports(record["text"])
            if self.tokenizer is not None:
                outcome.tokens = self.tokenizer.encode(repo.file_piece(record["path"], record["text"]))


def count_filter_stages(count: report_lib.Count, outcome: FileOutcome) -> bool:
    """Counts language, quality and decontamination for one read file; True when it is kept."""
    for stage in ("language", "quality", "decontamination"):
        if outcome.dropped_by == stage:
            report_lib.dropped(count, stage, outcome.size, outcome.reason)
            if stage == "decontamination":
                count(f"contamination/{outcome.reason}", 1)
            return False
        report_lib.passed(count, stage, outcome.size)
    if outcome.contamination:
        count(f"contamination/{outcome.contamination}", 1)
    return True


def count_dedup_and_pii(count: report_lib.Count, size: int, redacted_size: int, pii_counts: Mapping[str, int], duplicate: str | None) -> bool:
    """Counts the dedup decision of one filtered file ('exact', 'near' or None) and, when kept,
    its PII redactions; True when it is kept."""
    if duplicate == "exact":
        report_lib.dropped(count, "exact_dedup", size, "duplicate")
        count("duplicates/exact", 1)
        return False
    report_lib.passed(count, "exact_dedup", size)
    if duplicate == "near":
        report_lib.dropped(count, "near_dedup", size, "near_duplicate")
        count("duplicates/near", 1)
        return False
    report_lib.passed(count, "near_dedup", size)
    report_lib.passed(count, "pii", size, redacted_size)
    for kind, value in pii_counts.items():
        count(f"pii/{kind}", value)
    return True
