"""Optimizer from config: AdamW with a weight-decay mask, learning-rate schedules, gradient clipping."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import jax
import optax
from pydantic import Field

from configs.schema import section

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


@section
class OptimConfig:
    """The `optim` section: AdamW after global-norm clipping, with a learning-rate schedule."""

    lr: NonNegative = 3e-4
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 1000
    min_lr_ratio: Fraction = 0.1  # final lr = lr * min_lr_ratio
    wsd_decay_fraction: Fraction = 0.2  # wsd: the last fraction of steps decays linearly
    b1: Fraction = 0.9
    b2: Fraction = 0.95
    eps: NonNegative = 1e-8
    weight_decay: NonNegative = 0.1
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False
    clip_norm: NonNegative = 1.0  # 0 disables clipping


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay / warmup-stable-decay / constant.

    cosine: decays to lr * min_lr_ratio at `total_steps`. wsd (warmup-stable-decay, Hu et al. 2024):
    constant lr until the last `wsd_decay_fraction` of the steps, then linear decay to lr * min_lr_ratio.
    """
    peak, warmup = optim.lr, optim.warmup_steps
    end = peak * optim.min_lr_ratio
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if optim.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    decay_steps = max(int(total_steps * optim.wsd_decay_fraction), 1)
    stable_until = max(total_steps - decay_steps, warmup)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay_steps)],
        [warmup, stable_until],
    )


def _path_names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def weight_decay_mask(params: Any, optim: OptimConfig) -> Any:
    """True for parameters that get weight decay: matrices, unless configured otherwise.

    Norm scales/biases, biases and the input embedding are excluded by default (as in GPT-3,
    Chinchilla and most open recipes); `decay_norms`, `decay_biases`, `decay_embeddings` turn them on.
    """

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = _path_names(path)
        leaf = next((n for n in reversed(names) if not n.isdigit() and n != "value"), "")
        if any("norm" in n for n in names):
            return optim.decay_norms
        if leaf.endswith("bias"):
            return optim.decay_biases
        if leaf == "embed":
            return optim.decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimConfig, total_steps: int, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) after global-norm clipping."""
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(
        schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
        mask=weight_decay_mask(params, optim),
    )
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    return optax.chain(*parts, adamw), schedule
