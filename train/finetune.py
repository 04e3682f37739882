"""Pieces that every job starting from a trained model shares (SFT, RL): the starting weights, what
trains, held-out problems and the execution service that scores them."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from evals.problems import Problem, load_problems
from models.config import ModelConfig
from models.pretrained import (
    CHECKPOINTS,
    extend_model,
    load_pretrained,
    pretrained_model_config,
    trainable_variables,
)
from models.sharding import Rules
from sandbox.local import LocalSandbox

SYNTHETIC = "synthetic"  # the embedded problem family (evals/synthetic.py)


def load_starting_model(init_from: str, model_cfg: ModelConfig, mesh: Mesh, rules: Rules, seed: int = 0) -> nnx.Module:
    """`init_from`'s weights (a codelm run directory or an HF checkpoint) under `model_cfg` (the
    checkpoint's config with the job's overrides: remat, dtype, ...), plus fresh LoRA adapters when
    `model_cfg.lora` is set."""
    lora = model_cfg.lora
    base_cfg = model_cfg.replace(lora=None) if lora is not None else model_cfg
    saved = pretrained_model_config(init_from)
    overrides = {f.name: getattr(base_cfg, f.name) for f in dataclasses.fields(ModelConfig)
                 if f.name not in ("name", "lora") and getattr(base_cfg, f.name) != getattr(saved, f.name)}
    model, _ = load_pretrained(init_from, mesh=mesh, rules=rules, **overrides)
    return extend_model(model, model_cfg, seed=seed) if lora is not None else model


def trainable_filter(model_cfg: ModelConfig) -> Any:
    """The variables the optimizer updates: the LoRA adapters when LoRA is on, else every parameter."""
    return trainable_variables(model_cfg)


def has_checkpoints(output_dir: str | Path) -> bool:
    """Whether a run directory holds a checkpoint to resume (then the starting weights are not loaded)."""
    return any(p.name.isdigit() for p in (Path(output_dir) / CHECKPOINTS).glob("*"))


def heldout_problems(spec: str, limit: int = 0) -> list[Problem]:
    """`spec`: "synthetic" (the embedded held-out problems) or a HumanEval/MBPP-style JSONL file."""
    if spec == SYNTHETIC:
        from evals.synthetic import heldout_problems as synthetic_heldout  # noqa: PLC0415

        problems = synthetic_heldout()
    else:
        problems = load_problems(spec)
    return problems[:limit] if limit else problems


@contextlib.contextmanager
def execution_service(spec: str, workers: int = 2) -> Iterator[list[str]]:
    """The URLs of `spec`: "" (none), "local" (a private service for the job, stopped after it) or
    comma-separated URLs of running services."""
    if spec != "local":
        yield [url.strip() for url in spec.split(",") if url.strip()]
        return
    with LocalSandbox(workers=workers) as service:
        yield [service.url]
