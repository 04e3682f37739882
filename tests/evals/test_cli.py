"""`python -m evals.humaneval` end to end: scoring a completion file, an MBPP-style problem set,
sampling through the generator protocol, and clear failures."""

import json
import os
import subprocess
import sys

import pytest

from evals import humaneval
from evals.generation import GenerationError, load_checkpoint_generator
from evals.problems import load_problems
from tests.evals.test_problems import MBPP_RECORD, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evals.humaneval", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_scores_a_completion_file_on_an_mbpp_style_set(tmp_path, service):
    problems = write_jsonl(tmp_path / "mbpp.jsonl", [
        MBPP_RECORD,
        {"task_id": 11, "text": "Remove first and last occurrence of a given character from the string.",
         "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"']},
    ])
    remove_occ = ("def remove_Occ(s, ch):\n    first = s.find(ch)\n    s = s[:first] + s[first + 1:]\n"
                  "    last = s.rfind(ch)\n    return s[:last] + s[last + 1:]\n")
    completions = write_jsonl(tmp_path / "c.jsonl", [
        {"task_id": 2, "completion": MBPP_RECORD["code"]},
        {"task_id": 2, "completion": "def similar_elements(a, b):\n    return ()\n"},
        {"task_id": 11, "completion": remove_occ},
        {"task_id": 11, "completion": "def remove_Occ(s, ch):\n    return s[1:]\n"},
    ])
    output = tmp_path / "out"
    result = cli(f"--config.problems={problems}", f"--config.completions={completions}", f"--config.output={output}",
                 f"--config.sandbox.url={service.url}", "--config.ks=1,2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0 and summary["outcomes"]["failed"] == 2
    table = (output / "per_problem.md").read_text()
    assert "| 2 | 2 | 1 | 0.500 | 1.000 | passed=1, failed=1 | AssertionError |" in table
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert [(s["task_id"], s["outcome"]) for s in samples] == [("2", "passed"), ("2", "failed"),
                                                              ("11", "passed"), ("11", "failed")]


def test_reference_solutions_with_a_private_service(tmp_path):
    result = cli("--config.reference=True", "--config.limit=8", f"--config.output={tmp_path}", "--config.sandbox.workers=2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pass@1"] == 1.0


def test_bad_completion_file_is_named(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"task_id": "HumanEval/0", "completion": 7}'])
    result = cli(f"--config.completions={bad}", f"--config.output={tmp_path}")
    assert result.returncode == 1
    assert f"{bad}:1: field `completion` missing or not a string" in result.stderr


def test_checkpoint_without_sampler_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "models.sampler", None)  # as if models/sampler.py did not exist
    with pytest.raises(GenerationError, match="needs codelm's sampler"):
        load_checkpoint_generator("runs/some-checkpoint")


def test_module_imports_without_the_model_stack():
    code = "import sys, evals.humaneval; assert 'models.sampler' not in sys.modules and 'jax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_sampling_path_with_a_generator(tmp_path, service, monkeypatch):
    problems = {p.prompt: p for p in load_problems()[:4]}
    calls = []

    class CannedGenerator:
        """Returns the canonical solution followed by junk past a stop sequence."""

        def generate(self, prompts, num_samples, max_new_tokens, temperature, stop):
            calls.append((len(prompts), num_samples, max_new_tokens, temperature, tuple(stop)))
            return [[problems[p].reference + "\ndef junk(:\n"] * num_samples for p in prompts]

    monkeypatch.setattr(humaneval, "load_checkpoint_generator", lambda checkpoint: CannedGenerator())
    args = humaneval.EvalConfig(
        checkpoint="ckpt", limit=4, output=str(tmp_path), ks="1,2",
        sampler=humaneval.EvalSamplerSection(samples_per_problem=2, temperature=0.8, batch_size=3),
        sandbox=humaneval.SandboxSection(url=service.url))
    results = humaneval.run(args)
    assert results["pass@1"] == results["pass@2"] == 1.0
    assert [c[0] for c in calls] == [3, 1] and all(c[1:4] == (2, 512, 0.8) for c in calls)
    assert "\ndef" in calls[0][4]
    written = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(written) == 8 and not any("junk" in c["completion"] for c in written)


def test_config_errors_are_one_line_with_the_field():
    result = cli("--config.completions=a.jsonl", "--config.reference=True")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: completions: give exactly one of completions, checkpoint, reference=True")
    result = cli("--config.reference=True", "--config.sandbox.worker=2")
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: no field 'sandbox.worker'; did you mean 'sandbox.workers'?")
