"""pass@k of the model being trained, as a Trainer hook: sample completions of held-out problems with
the current parameters (codelm's sampler), run them in the execution service, log pass@k.

    trainer.add_hook(PassAtK(problems, tokenizer, urls, ...), every=run.train.eval_every, at_start=True)

SFT and RL use it; the scoring is `evals` (the same code as `python -m evals.humaneval`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from flax import nnx

from evals.generation import SamplerGenerator, sample_completions
from evals.harness import Report, evaluate
from evals.problems import Problem
from models.sampler import Sampler
from sandbox.client import SandboxClient
from train.metrics import print_progress


@dataclasses.dataclass
class PassAtK:
    """Hook computing pass@k on `problems` with `num_samples` samples each (k <= num_samples).

    urls: the execution service endpoint(s). Results are logged under split "eval" as `pass@<k>`
    and kept in `history` (step -> {"pass@1": ...}).
    """

    problems: Sequence[Problem]
    tokenizer: Any
    urls: Sequence[str]
    num_samples: int = 1
    ks: Sequence[int] = (1,)
    temperature: float = 0.0
    max_new_tokens: int = 128
    max_len: int = 512
    batch_size: int = 16
    run_timeout: float = 10.0
    history: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    per_problem: dict[int, list[float]] = dataclasses.field(default_factory=dict)  # step -> pass@1 per problem

    def report(self, model: nnx.Module, seed: int = 0) -> Report:
        """The harness's report of `model` on the problems (per-problem sample outcomes)."""
        max_len = min(self.max_len, model.cfg.max_seq_len)
        generator = SamplerGenerator(Sampler(model, self.tokenizer, max_len=max_len), seed=seed)
        completions = sample_completions(generator, self.problems, num_samples=self.num_samples,
                                         max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                         batch_size=self.batch_size)

        async def score() -> Any:
            async with SandboxClient(list(self.urls)) as client:
                return await evaluate(self.problems, completions, client, ks=self.ks, run_timeout=self.run_timeout,
                                      progress=False)

        return asyncio.run(score())

    def scores(self, model: nnx.Module, seed: int = 0) -> dict[str, float]:
        """{"pass@k": ...} of `model` on the problems."""
        return self.report(model, seed).pass_at_k()

    def __call__(self, info: Any) -> None:
        trainer = info.trainer
        with trainer.timer.paused(info.state):
            model = nnx.merge(trainer.graphdef, info.state.params, info.state.rest)
            report = self.report(model, seed=info.step)
        values = report.pass_at_k()
        self.history[info.step] = values
        self.per_problem[info.step] = [p.correct / p.n for p in report.problems]
        trainer.log(info.step, values, prefix="eval")
        print_progress(f"step {info.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
