"""HumanEval end to end through codelm itself: a model trained by train.trainer, loaded from its run
directory, sampled with models.sampler, executed in the sandbox service, scored with pass@k."""

import json

from evals import humaneval
from tests.train.conftest import corpus_dir, small_run, tokenizer  # noqa: F401  (fixtures)
from tests.train.test_trainer import make_task, train


def test_humaneval_samples_from_a_trained_run(corpus_dir, tokenizer, tmp_path, capsys):  # noqa: F811
    run = small_run(corpus_dir, tmp_path / "run", train__steps=2)
    train(run, make_task(run, tokenizer))
    out = tmp_path / "eval"
    humaneval.main(humaneval.EvalConfig(
        checkpoint=str(tmp_path / "run"), limit=3, ks="1,2", output=str(out),
        sampler=humaneval.EvalSamplerSection(samples_per_problem=2, temperature=0.8, max_new_tokens=8),
        sandbox=humaneval.SandboxSection(workers=2)))
    results = json.loads((out / "results.json").read_text())
    assert results["num_problems"] == 3 and results["num_samples"] == 6
    assert sum(results["outcomes"].values()) == 6  # every sample was executed and judged
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 6 and all(isinstance(c["completion"], str) for c in completions)
    assert 0.0 <= results["pass@1"] <= results["pass@2"] <= 1.0
