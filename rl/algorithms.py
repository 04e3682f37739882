"""The GRPO family's maths: advantage estimators, policy losses, KL estimators, loss aggregation, DAPO's
dynamic sampling and overlong shaping. Pure functions of arrays; `rl.train` wires them together.

Shapes: P prompts per rollout batch, G samples per prompt (a group), N = P * G sequences, T response
tokens per sequence (right padded; `mask` [.., T] is 1 on response tokens that train). The device-side
functions also take packed rows (`Packing`: several sequences per row told apart by segment ids, as the
rollouts pack them to skip padding); "per sequence" then means per packed sequence, never per row.

Advantages (host side, numpy, outcome rewards: one scalar per sequence), `advantages(name, rewards [P, G],
mask [P, G, T]) -> [P, G, T]`:
  grpo        (r - mean_g) / (std_g + eps), std unbiased (DeepSeekMath; verl `compute_grpo_outcome_advantage`)
  drgrpo      r - mean_g: no std (Dr.GRPO, arXiv:2503.20783; pair it with `seq-mean-token-sum-norm`)
  rloo        G / (G - 1) * (r - mean_g) = r - mean of the other G - 1 (Ahmadian et al., arXiv:2402.14740)
  reinforce++ the return (outcome reward, gamma 1) whitened over every response token of the batch
              (REINFORCE++, arXiv:2501.03262)
  reinforce++_baseline  r - mean_g, then whitened over every response token of the batch (same paper)
A group of one gets baseline 0 (and std 1), as verl's loop implementations do (its rloo_vectorized
returns 0 there instead). tests/rl/test_verl_parity.py compares the estimators, losses, KL, entropy and IS
weights with verl 0.9.1's code.

Policy loss (device side, jax, inside the loss function), per token [N, T]:
  ratio        exp(logp - old_logp) ("token", PPO) or GSPO's sequence ratio exp(mean_t(logp - old_logp))
               carried per token as sg[s_i] * exp(logp - sg[logp]) (arXiv:2507.18071)
  ppo-clip     max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)); clip_high > clip_low is
               DAPO's clip-higher (arXiv:2503.14476); with ratio == 1 its gradient is -A * grad logp
  truncated IS per-token weight min(exp(old_logp - sampler_logp), cap) (sg) on the loss, correcting the
               sampler-vs-trainer log-prob mismatch (Yao et al., "Your efficient RL framework secretly
               brings you off-policy RL training", 2025)
  KL           k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) + log r - 1 with log r = logp - ref_logp
               (Schulman, "Approximating KL divergence", 2020); k3 >= 0 and unbiased for KL(pi || ref)
  entropy      of the full softmax at each response position; the loss subtracts entropy_coef * H
Aggregation `aggregate(loss [N, T], mask [N, T], mode) -> (sum, weight)`, the train step's convention
(`train.step.LossOutput`: micro-batches add sums and weights, the step divides once):
  token-mean            sum_nt l / sum_nt m               (DAPO)
  seq-mean-token-mean   sum_n (sum_t l / sum_t m) / #seqs (GRPO paper)
  seq-mean-token-sum    sum_nt l / #seqs
  seq-mean-token-sum-norm  sum_nt l / (#seqs * horizon)   (Dr.GRPO: a constant normaliser; horizon T by default)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce++", "reinforce++_baseline")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
Estimator = Literal["grpo", "drgrpo", "rloo", "reinforce++", "reinforce++_baseline"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
RatioLevel = Literal["token", "sequence"]

_LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before exp, for stability (verl clamps the same way)
_K3_CLAMP = 10.0  # verl's bound on the k3 value (kl_penalty_forward)


# ---- advantages (numpy, host) ---------------------------------------------------------------------------


def _group_baseline(rewards: np.ndarray) -> np.ndarray:
    """Group means [P, 1] of rewards [P, G]; 0 for groups of one (no baseline)."""
    if rewards.shape[1] == 1:
        return np.zeros_like(rewards[:, :1])
    return rewards.mean(axis=1, keepdims=True)


def _masked_whiten(values: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(values - mean) / sqrt(var + eps) with mean and unbiased variance over mask > 0 (all dims)."""
    n = mask.sum()
    if n < 2:
        raise ValueError("whitening needs at least two response tokens in the batch")
    mean = (values * mask).sum() / n
    var = (np.square(values - mean) * mask).sum() / n * (n / (n - 1))
    return (values - mean) / np.sqrt(var + eps)


def grpo_advantages(rewards: np.ndarray, eps: float = 1e-6, scale_by_std: bool = True) -> np.ndarray:
    """GRPO: (r - group mean) / (group std + eps), std with Bessel's correction; [P, G] -> [P, G].
    `scale_by_std=False` is Dr.GRPO."""
    rewards = np.asarray(rewards, np.float64)
    centred = rewards - _group_baseline(rewards)
    if not scale_by_std:
        return centred
    std = rewards.std(axis=1, ddof=1, keepdims=True) if rewards.shape[1] > 1 else np.ones_like(rewards[:, :1])
    return centred / (std + eps)


def rloo_advantages(rewards: np.ndarray) -> np.ndarray:
    """RLOO: r_i - mean of the group's other samples = G / (G - 1) * (r_i - group mean); [P, G] -> [P, G]."""
    rewards = np.asarray(rewards, np.float64)
    g = rewards.shape[1]
    if g == 1:
        return rewards.copy()
    return (rewards - _group_baseline(rewards)) * g / (g - 1)


def reinforce_pp_advantages(rewards: np.ndarray, mask: np.ndarray, *, baseline: bool) -> np.ndarray:
    """REINFORCE++ (return = outcome reward at every response token, gamma 1) or REINFORCE++-baseline
    (group-mean baseline first), whitened over every response token of the batch; rewards [P, G],
    mask [P, G, T] -> [P, G, T] (0 off the mask)."""
    rewards = np.asarray(rewards, np.float64)
    mask = np.asarray(mask, np.float64)
    centred = rewards - _group_baseline(rewards) if baseline else rewards
    returns = centred[..., None] * mask
    return _masked_whiten(returns, mask) * mask


def advantages(estimator: Estimator, rewards: np.ndarray, mask: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-token advantages [P, G, T] (float32, 0 off the mask) of outcome rewards [P, G]."""
    mask = np.asarray(mask, np.float64)
    if estimator in ("grpo", "drgrpo"):
        per_seq = grpo_advantages(rewards, eps, scale_by_std=estimator == "grpo")
    elif estimator == "rloo":
        per_seq = rloo_advantages(rewards)
    elif estimator in ("reinforce++", "reinforce++_baseline"):
        return reinforce_pp_advantages(rewards, mask, baseline=estimator == "reinforce++_baseline").astype(np.float32)
    else:
        raise ValueError(f"estimator: {estimator!r}; known: {', '.join(ESTIMATORS)}")
    return (per_seq[..., None] * mask).astype(np.float32)


# ---- rewards shaping and dynamic sampling (numpy, host) -----------------------------------------------------


def soft_overlong_penalty(lengths: np.ndarray, max_length: int, cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), added to the reward: 0 up to
    max_length - cache tokens, then falling linearly to -1 at max_length, -1 beyond."""
    lengths = np.asarray(lengths, np.float64)
    start = max_length - cache
    if cache <= 0:
        return np.where(lengths > max_length, -1.0, 0.0)
    return np.where(lengths <= start, 0.0, np.where(lengths <= max_length, (start - lengths) / cache, -1.0))


def zero_variance_groups(rewards: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """bool [P]: groups whose rewards are all equal (no learning signal under group baselines)."""
    rewards = np.asarray(rewards, np.float64)
    return (rewards.max(axis=1) - rewards.min(axis=1)) <= tol


def select_groups(pools: Sequence[np.ndarray], want: int) -> list[tuple[int, int]]:
    """DAPO dynamic sampling: from successive rollout rounds' group rewards (each [P_r, G]), the
    (round, group) pairs of the first `want` groups whose rewards are not all equal, in order."""
    chosen: list[tuple[int, int]] = []
    for r, rewards in enumerate(pools):
        for g in np.flatnonzero(~zero_variance_groups(rewards)):
            if len(chosen) == want:
                return chosen
            chosen.append((r, int(g)))
    return chosen


# ---- policy loss (jax, device) ------------------------------------------------------------------------------


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Packing(NamedTuple):
    """Where the sequences are when several share a row (sequence packing, no padding to compute): segment
    ids [N, T] number a row's sequences 1..`max_per_row` (0: padding). None stands for one sequence per row."""

    segment_ids: jax.Array
    max_per_row: int  # static


def sequence_sums(x: jax.Array, packing: Packing | None) -> jax.Array:
    """Per-sequence sums of `x` [N, T]: [N, 1] with one sequence per row, [N, S] for packed rows (S =
    max_per_row; a slot without a sequence sums to 0)."""
    if packing is None:
        return jnp.sum(x, axis=-1, keepdims=True)
    slots = jnp.arange(1, packing.max_per_row + 1)
    members = (packing.segment_ids[..., None] == slots).astype(x.dtype)  # [N, T, S]
    return jnp.einsum("nt,nts->ns", x, members)


def per_token(values: jax.Array, packing: Packing | None) -> jax.Array:
    """A per-sequence value [N, S] (from `sequence_sums`) back on each of the sequence's tokens [N, T]."""
    if packing is None:
        return values  # [N, 1] broadcasts over the row
    return jnp.take_along_axis(values, jnp.maximum(packing.segment_ids - 1, 0), axis=1)


def aggregate(loss: jax.Array, mask: jax.Array, mode: Aggregation, horizon: int | None = None,
              packing: Packing | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum, weight) of per-token `loss` [N, T] over `mask` [N, T]: sum / weight is the aggregated loss,
    and sums and weights of micro-batches add up to the whole batch's (module docstring). `horizon` is
    seq-mean-token-sum-norm's constant token count (Dr.GRPO's generation budget, verl's loss_scale_factor);
    None: T, which is the response budget only when the rows hold response tokens alone. With `packing`,
    the sequence modes count each packed sequence, not each row."""
    mask = mask.astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(loss * mask), jnp.sum(mask)
    per_seq_tokens = sequence_sums(mask, packing)  # [N, S]
    sequences = jnp.sum((per_seq_tokens > 0).astype(jnp.float32))
    if mode == "seq-mean-token-mean":
        return jnp.sum(sequence_sums(loss * mask, packing) / jnp.maximum(per_seq_tokens, 1.0)), sequences
    if mode == "seq-mean-token-sum":
        return jnp.sum(loss * mask), sequences
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(loss * mask), sequences * (loss.shape[-1] if horizon is None else horizon)
    raise ValueError(f"aggregation: {mode!r}; known: {', '.join(AGGREGATIONS)}")


def log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, level: RatioLevel,
              packing: Packing | None = None) -> jax.Array:
    """log importance ratio [N, T] of the current policy to the old one, per token ("token") or GSPO's
    length-normalised sequence ratio with a per-token gradient ("sequence")."""
    delta = jnp.clip(logp - old_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if level == "token":
        return delta
    if level == "sequence":
        seq = sequence_sums(delta * mask, packing) / jnp.maximum(sequence_sums(mask, packing), 1.0)  # [N, S]
        combined = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(per_token(seq, packing))
        return jnp.minimum(combined, 10.0)  # verl's bound for GSPO
    raise ValueError(f"ratio level: {level!r}; known: token, sequence")


class PolicyLoss(NamedTuple):
    loss: jax.Array  # [N, T] per-token loss (before aggregation)
    ratio: jax.Array  # [N, T]
    clipped: jax.Array  # [N, T] float: the clipped branch was taken (gradient 0 there)


def ppo_clip(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, mask: jax.Array, *, clip_low: float,
             clip_high: float, level: RatioLevel = "token", dual_clip: float = 0.0,
             packing: Packing | None = None) -> PolicyLoss:
    """PPO's clipped surrogate with separate bounds: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)),
    all [N, T]. level "sequence" is GSPO. dual_clip c > 1 also bounds the loss of negative advantages by
    -A c (dual-clip PPO, arXiv:1912.09729; verl's clip_ratio_c); 0 disables it."""
    if dual_clip and dual_clip <= 1.0:  # c <= 1 would bound the loss at or below its on-policy value
        raise ValueError(f"dual_clip: {dual_clip}; must be > 1, or 0 to disable it")
    ratio = jnp.exp(log_ratio(logp, old_logp, mask, level, packing))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return PolicyLoss(loss, ratio, (clipped > unclipped).astype(jnp.float32))


def truncated_is_weights(old_logp: jax.Array, sampler_logp: jax.Array, cap: float) -> jax.Array:
    """min(pi_old / pi_sampler, cap) per token [N, T], without gradient (truncated importance sampling)."""
    log_w = jnp.clip(old_logp - sampler_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), cap))


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
    """Per-token estimate [N, T] of KL(pi || ref) from samples of pi: k1, k2 or k3 (module docstring)."""
    delta = logp - ref_logp
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * jnp.square(delta)
    if kind == "k3":
        neg = jnp.clip(-delta, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(neg) - neg - 1.0, -_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"kl estimator: {kind!r}; known: {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy [..] of softmax(logits [.., V])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
