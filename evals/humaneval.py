"""Evaluate code completions on HumanEval (or any MBPP-style/HumanEval-style JSONL problem set).

    python -m evals.humaneval --config.completions=samples.jsonl          # score any model's output
    python -m evals.humaneval --config.checkpoint=runs/x --config.sampler.samples_per_problem=20 \
        --config.sampler.temperature=0.8
    python -m evals.humaneval --config.reference=True                     # the set's own solutions (sanity)

Every field: configs/humaneval.py. Programs run in the execution service at sandbox.url, or in a
private one started for the run. Writes results.json, samples.jsonl, per_problem.md (and
completions.jsonl when sampling) to `output` and prints the summary as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Annotated, Any

from ml_collections import ConfigDict
from pydantic import Field

from configs import cli
from configs.schema import ConfigError, parse, section
from evals.completions import CompletionsError, read_completions, write_completions
from evals.generation import GenerationError, load_checkpoint_generator, sample_completions
from evals.harness import EvaluationError, Report, evaluate, write_report
from evals.problems import Problem, ProblemFormatError, humaneval_path, load_problems
from sandbox.client import SandboxClient
from sandbox.local import LocalSandbox

_CONFIG = cli.define_config("configs/humaneval.py")


@section
class SandboxSection:
    url: str = ""
    workers: Annotated[int, Field(ge=0)] = 0
    concurrency: Annotated[int, Field(ge=1)] = 64
    run_timeout: Annotated[float, Field(gt=0)] = 10.0
    memory_mb: Annotated[int, Field(ge=-1)] = -1


@section
class EvalSamplerSection:
    samples_per_problem: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0)] = 0.0
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    batch_size: Annotated[int, Field(ge=1)] = 8


@section
class EvalConfig:
    problems: str = ""
    limit: Annotated[int, Field(ge=0)] = 0
    completions: str = ""
    checkpoint: str = ""
    reference: bool = False
    allow_missing: bool = False
    output: Annotated[str, Field(min_length=1)] = "artifacts/evals/humaneval"
    ks: str = "1,10,100"
    sandbox: SandboxSection = SandboxSection()
    sampler: EvalSamplerSection = EvalSamplerSection()

    def __post_init__(self) -> None:
        if sum([bool(self.completions), bool(self.checkpoint), self.reference]) != 1:
            raise ConfigError("completions: give exactly one of completions, checkpoint, reference=True")
        try:
            ks = [int(k) for k in self.ks.split(",") if k.strip()]
        except ValueError:
            raise ConfigError(f"ks: expected comma-separated integers, got {self.ks!r}") from None
        if not ks or min(ks) < 1:
            raise ConfigError(f"ks: values must be >= 1, got {self.ks!r}")

    @property
    def k_values(self) -> list[int]:
        return [int(k) for k in self.ks.split(",") if k.strip()]


def load_config(cfg: ConfigDict) -> EvalConfig:
    return parse(EvalConfig, cfg.to_dict())


def _completions(args: EvalConfig, problems: list[Problem]) -> dict[str, list[str]]:
    if args.completions:
        return read_completions(args.completions, problems, allow_missing=args.allow_missing)
    if args.reference:
        missing = [p.task_id for p in problems if p.reference is None]
        if missing:
            raise ProblemFormatError(f"{len(missing)} problems have no reference solution (first: {missing[0]})")
        return {p.task_id: [p.reference] for p in problems}
    generator = load_checkpoint_generator(args.checkpoint)
    sampler = args.sampler
    completions = sample_completions(generator, problems, num_samples=sampler.samples_per_problem,
                                     max_new_tokens=sampler.max_new_tokens, temperature=sampler.temperature,
                                     batch_size=sampler.batch_size)
    os.makedirs(args.output, exist_ok=True)
    write_completions(os.path.join(args.output, "completions.jsonl"), completions)
    return completions


async def _score(args: EvalConfig, url: str, problems: list[Problem], completions: dict[str, list[str]]) -> Report:
    async with SandboxClient(url, max_concurrency=args.sandbox.concurrency) as client:
        return await evaluate(problems, completions, client, ks=args.k_values, run_timeout=args.sandbox.run_timeout,
                              memory_limit_mb=args.sandbox.memory_mb)


def run(args: EvalConfig) -> dict[str, Any]:
    problems = load_problems(args.problems or None)
    if args.limit:
        problems = problems[:args.limit]
    completions = _completions(args, problems)
    if args.sandbox.url:
        report = asyncio.run(_score(args, args.sandbox.url, problems, completions))
    else:
        workers = args.sandbox.workers or os.cpu_count()
        with LocalSandbox(workers=workers, max_queue=max(256, args.sandbox.concurrency)) as service:
            report = asyncio.run(_score(args, service.url, problems, completions))
    source = args.completions or (f"checkpoint {args.checkpoint}" if args.checkpoint else "reference solutions")
    metadata = {"problems": args.problems or humaneval_path(), "completions": source,
                "run_timeout": args.sandbox.run_timeout,
                "samples_per_problem": args.sampler.samples_per_problem if args.checkpoint else None,
                "temperature": args.sampler.temperature if args.checkpoint else None}
    return write_report(report, args.output, metadata)


def main(args: EvalConfig) -> None:
    try:
        results = run(args)
    except (ProblemFormatError, CompletionsError, GenerationError, EvaluationError) as e:
        sys.exit(f"evals.humaneval: {e}")
    summary = {k: v for k, v in results.items() if k != "per_problem"}
    print(json.dumps(summary, indent=2))
    print(f"[evals] per-problem table: {os.path.join(args.output, 'per_problem.md')}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, _CONFIG, load_config)
