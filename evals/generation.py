"""Sampling completions from a model, behind one small protocol.

Any object with this `generate` method can be evaluated; codelm's own (`SamplerGenerator`) is built from a
checkpoint by `load_checkpoint_generator` (the model stack is imported only when sampling, so the
evaluation harness works without it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol

from evals.problems import Problem


class Generator(Protocol):
    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int, temperature: float,
                 stop: list[str]) -> list[list[str]]:
        """For each prompt, `num_samples` continuations (the text after the prompt), each at most
        `max_new_tokens` tokens; generation may stop at the first of `stop` (callers truncate anyway).
        Returns a list of len(prompts) lists of num_samples strings."""
        ...


class GenerationError(RuntimeError):
    """The generator is unavailable or returned something malformed."""


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def sample_completions(generator: Generator, problems: Sequence[Problem], *, num_samples: int, max_new_tokens: int,
                       temperature: float, batch_size: int = 8) -> dict[str, list[str]]:
    """task_id -> num_samples completions. Prompts go to the generator `batch_size` at a time with the
    union of their stop sequences; each completion is then cut at its own problem's. Progress on stderr."""
    completions: dict[str, list[str]] = {}
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        stop = sorted({s for problem in batch for s in problem.stop})
        outputs = generator.generate([p.prompt for p in batch], num_samples, max_new_tokens, temperature, stop)
        if len(outputs) != len(batch) or any(len(o) != num_samples or not all(isinstance(t, str) for t in o) for o in outputs):
            raise GenerationError(f"generator returned {len(outputs)} lists for {len(batch)} prompts; expected "
                                  f"{len(batch)} lists of {num_samples} strings")
        for problem, samples in zip(batch, outputs):
            completions[problem.task_id] = [truncate_at_stop(s, problem.stop) for s in samples]
        print(f"[evals] sampled {min(start + batch_size, len(problems))}/{len(problems)} problems", file=sys.stderr)
    return completions


class SamplerGenerator:
    """The `Generator` protocol over codelm's `models.sampler.Sampler`: the `num_samples` samples of a
    prompt share one prefill of it (`generate(..., n=num_samples)`), rows are refilled as samples
    finish; a fixed seed makes a run reproducible."""

    def __init__(self, sampler: Any, seed: int = 0):
        self.sampler, self.seed = sampler, seed

    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int, temperature: float,
                 stop: list[str]) -> list[list[str]]:
        texts = self.sampler.generate(prompts, max_new_tokens, n=num_samples, temperature=temperature, stop=stop,
                                      seed=self.seed).texts
        self.seed += 1
        return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def load_checkpoint_generator(checkpoint: str, max_len: int = 2048) -> Generator:
    """codelm's generator for a checkpoint: a training run directory (run_config.json, see
    `models.pretrained.load_trained_model`) or a Hugging Face directory (config.json + safetensors +
    tokenizer.json)."""
    try:  # deferred: scoring completions must not need the model stack
        from models.sampler import Sampler  # noqa: PLC0415
    except ImportError as e:
        raise GenerationError(
            f"sampling from --checkpoint={checkpoint} needs codelm's sampler (models/sampler.py), which cannot be "
            f"imported ({e}); score existing completions with --completions=FILE instead") from None
    from models.pretrained import load_pretrained  # noqa: PLC0415

    try:
        model, tokenizer = load_pretrained(checkpoint)
    except FileNotFoundError as e:
        raise GenerationError(f"--checkpoint={checkpoint}: {e}") from None
    if tokenizer is None:
        raise GenerationError(f"--checkpoint={checkpoint}: no tokenizer saved with the run")
    return SamplerGenerator(Sampler(model, tokenizer, max_len=min(max_len, model.cfg.max_seq_len)))
