"""rl.algorithms against verl 0.9.1's own code (`verl.trainer.ppo.core_algos`, `rollout_corr_helper`,
`verl.utils.torch_functional`), called on torch tensors built from the same numpy arrays.

verl is a test-only reference (requirements-reference.txt, installed with --no-deps): a missing verl fails
these tests. Values are compared, and where a loss trains the policy, its gradient with respect to the
current log-probs too (torch autograd against jax.grad): the detach tricks of GSPO and the clamps of k3
only show in the gradient. verl runs in float64, codelm in float32 as it trains; tolerances are float32's.

Where verl's semantics differ on purpose, the test uses the matching configuration and says so:
  - verl's vanilla loss always applies dual-clip (clip_ratio_c, default 3); codelm's `dual_clip=0` (off)
    is verl with an unreachable clip_ratio_c.
  - verl puts an outcome reward on the last response token (token_level_rewards); codelm takes one
    scalar per sequence. The tests place codelm's reward the way verl's reward manager does.
  - verl's truncated-IS weights are 0 off the response mask; codelm's are not masked (the loss is).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import algorithms as alg

RTOL, ATOL = 1e-5, 1e-6
NO_DUAL_CLIP = 1e9  # verl clip_ratio_c that never binds: codelm's dual_clip=0


@pytest.fixture(scope="module")
def verl():
    """verl's modules, imported here so that collecting other tests does not pay for torch (~5 s CPU).
    Every tensor below is built on the CPU, so no accelerator is touched."""
    import torch
    import verl.utils.torch_functional as verl_f
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos, rollout_corr_helper
    from verl.workers.config import ActorConfig

    return types.SimpleNamespace(torch=torch, core=core_algos, corr=rollout_corr_helper, F=verl_f,
                                 AlgoConfig=AlgoConfig, ActorConfig=ActorConfig)


def tensor(verl, x, grad=False):
    return verl.torch.tensor(np.asarray(x, np.float64), dtype=verl.torch.float64, requires_grad=grad)


def actor_config(verl, clip_low, clip_high, clip_c=NO_DUAL_CLIP):
    """The smallest valid ActorConfig: the policy losses read only the clip ratios and global_batch_info
    (empty: one data-parallel rank, the micro-batch is the batch)."""
    return verl.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=clip_low,
                            clip_ratio_low=clip_low, clip_ratio_high=clip_high, clip_ratio_c=clip_c)


def random_mask(rng, n, t, min_len=1):
    return (np.arange(t)[None] < rng.integers(min_len, t + 1, (n, 1))).astype(np.float64)


def codelm_loss_grad(fn, logp):
    """fn(logp [N, T] jax float32) -> scalar; its value and gradient as float64 numpy."""
    value, grad = jax.value_and_grad(fn)(jnp.asarray(logp, jnp.float32))
    return float(value), np.asarray(grad, np.float64)


def verl_loss_grad(verl, fn, logp):
    """fn(logp [N, T] torch float64, requires grad) -> (scalar, metrics); value, gradient, metrics."""
    lp = tensor(verl, logp, grad=True)
    value, metrics = fn(lp)
    value.backward()
    return float(value.detach()), lp.grad.numpy(), metrics


# ---- advantages ---------------------------------------------------------------------------------------------


def outcome_batch(seed, p, g, t):
    """rewards [P, G] (0/1 plus noise; group 0 all equal: zero variance), mask [P, G, T] with one
    sequence that has no response token (an overlong-filtered one)."""
    rng = np.random.default_rng(seed)
    rewards = rng.integers(0, 2, (p, g)).astype(np.float64) + rng.normal(0, 0.1, (p, g))
    if g > 1:
        rewards[0] = 1.0
    mask = random_mask(rng, p * g, t).reshape(p, g, t)
    mask[-1, -1] = 0.0
    return rewards, mask


# codelm estimator -> (verl registry name, extra keyword arguments)
VERL_ESTIMATORS = {
    "grpo": [("grpo", {}), ("grpo_vectorized", {})],
    "drgrpo": [("grpo", {"norm_adv_by_std_in_grpo": False}), ("grpo_vectorized", {"norm_adv_by_std_in_grpo": False})],
    "rloo": [("rloo", {}), ("rloo_vectorized", {})],
    "reinforce++": [("reinforce_plus_plus", {})],
    "reinforce++_baseline": [("reinforce_plus_plus_baseline", {})],
}


@pytest.mark.parametrize(("seed", "p", "g", "t"), [(0, 3, 4, 6), (1, 4, 5, 7), (2, 5, 1, 4)])
@pytest.mark.parametrize("estimator", alg.ESTIMATORS)
def test_advantages_match_verl(verl, estimator, seed, p, g, t):
    """Every estimator against verl's registered advantage functions (both the loop and the vectorised
    versions where verl has two), with a zero-variance group, a response with no tokens and, for G = 1,
    groups of one (baseline 0, std 1 in both). For groups of one verl disagrees with itself on RLOO: the loop
    version keeps the raw reward (baseline 0), `rloo_vectorized` returns 0; codelm follows the loop version,
    so G = 1 skips the vectorised one. Dr.GRPO is verl's GRPO with norm_adv_by_std_in_grpo=False;
    REINFORCE++ is verl's with gamma 1 and the outcome reward on the last response token."""
    rewards, mask = outcome_batch(seed, p, g, t)
    flat_mask = mask.reshape(p * g, t)
    last = np.maximum(flat_mask.sum(-1).astype(int) - 1, 0)
    token_rewards = np.zeros_like(flat_mask)
    token_rewards[np.arange(p * g), last] = rewards.reshape(-1)
    index = np.repeat(np.arange(p), g)
    ours = alg.advantages(estimator, rewards, mask).reshape(p * g, t)
    assert np.abs(ours).max() > 0.1
    for name, kwargs in VERL_ESTIMATORS[estimator]:
        if g == 1 and name == "rloo_vectorized":
            continue
        ref, _ = verl.core.get_adv_estimator_fn(name)(
            token_level_rewards=tensor(verl, token_rewards), response_mask=tensor(verl, flat_mask), index=index,
            config=verl.AlgoConfig(gamma=1.0), **kwargs)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)


# ---- aggregation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", alg.AGGREGATIONS)
def test_aggregation_matches_verl_over_micro_batches(verl, mode):
    """codelm's (sum, weight) per micro-batch against verl's agg_loss: on the whole batch, and per
    micro-batch with verl's global normalisers (batch_num_tokens, global_batch_size), whose sum is the
    batch's loss in verl; codelm adds the micro-batches' sums and weights and divides once. A fully masked
    sequence is excluded from the sequence count in both."""
    rng = np.random.default_rng(3)
    loss, mask = rng.normal(size=(8, 6)), random_mask(rng, 8, 6)
    mask[2] = 0.0
    halves = [slice(0, 4), slice(4, 8)]
    parts = [alg.aggregate(jnp.asarray(loss[h], jnp.float32), jnp.asarray(mask[h], jnp.float32), mode) for h in halves]
    ours = float(sum(s for s, _ in parts) / sum(w for _, w in parts))

    whole = verl.core.agg_loss(tensor(verl, loss), tensor(verl, mask), mode)
    assert ours == pytest.approx(float(whole), rel=RTOL, abs=ATOL)
    glob = {"batch_num_tokens": mask.sum(), "global_batch_size": (mask.sum(-1) > 0).sum()}
    split = sum(float(verl.core.agg_loss(tensor(verl, loss[h]), tensor(verl, mask[h]), mode, **glob)) for h in halves)
    assert ours == pytest.approx(split, rel=RTOL, abs=ATOL)


def test_token_sum_norm_horizon_matches_verl_loss_scale_factor(verl):
    """seq-mean-token-sum-norm with a constant horizon other than the row width (rl.train's rows hold the
    prompt too, so their width is not the response budget) against verl's loss_scale_factor."""
    rng = np.random.default_rng(4)
    loss, mask = rng.normal(size=(5, 9)), random_mask(rng, 5, 9)
    total, weight = alg.aggregate(jnp.asarray(loss, jnp.float32), jnp.asarray(mask, jnp.float32),
                                  "seq-mean-token-sum-norm", horizon=4)
    ref = verl.core.agg_loss(tensor(verl, loss), tensor(verl, mask), "seq-mean-token-sum-norm", loss_scale_factor=4)
    assert float(total / weight) == pytest.approx(float(ref), rel=RTOL)


# ---- policy losses --------------------------------------------------------------------------------------------


def policy_batch(seed, n=8, t=7):
    """old/current/sampler log-probs, advantages and a mask [N, T]; ratios spread wide enough that both
    clip branches and the dual clip bind, one sequence fully masked."""
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, n, t)
    mask[2] = 0.0
    old = rng.normal(-1.5, 0.5, (n, t))
    logp = old + rng.normal(0, 0.6, (n, t))
    sampler = old + rng.normal(0, 0.4, (n, t))
    adv = rng.normal(0, 1, (n, t)) * mask
    return logp, old, sampler, adv, mask


@pytest.mark.parametrize("mode", alg.AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_ppo_clip_with_truncated_is_matches_verl(verl, mode, dual_clip):
    """Token-ratio PPO-clip with DAPO's clip-higher (0.2 / 0.28), dual clip on (verl's clip_ratio_c=3) and
    off, truncated-IS weights at cap 2: loss value, gradient in logp and clip fraction against verl's
    `vanilla` policy loss fed by its `compute_rollout_correction_weights` (rollout_is="token")."""
    logp, old, sampler, adv, mask = policy_batch(4)
    cap = 2.0
    j = {k: jnp.asarray(v, jnp.float32) for k, v in dict(old=old, sampler=sampler, adv=adv, mask=mask).items()}
    weights = alg.truncated_is_weights(j["old"], j["sampler"], cap)

    def ours(lp):
        out = alg.ppo_clip(lp, j["old"], j["adv"], j["mask"], clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
        total, weight = alg.aggregate(out.loss * weights, j["mask"], mode)
        return total / weight

    value, grad = codelm_loss_grad(ours, logp)
    clip_frac = float(alg.masked_mean(alg.ppo_clip(jnp.asarray(logp, jnp.float32), j["old"], j["adv"], j["mask"],
                                                   clip_low=0.2, clip_high=0.28).clipped, j["mask"]))

    ref_w, _ = verl.corr.compute_rollout_correction_weights(tensor(verl, old - sampler), tensor(verl, mask),
                                                            rollout_is="token", rollout_is_threshold=cap)
    cfg = actor_config(verl, 0.2, 0.28, dual_clip or NO_DUAL_CLIP)
    vanilla = verl.core.get_policy_loss_fn("vanilla")
    ref_value, ref_grad, metrics = verl_loss_grad(
        verl, lambda lp: vanilla(tensor(verl, old), lp, tensor(verl, adv), tensor(verl, mask), mode, cfg, ref_w), logp)

    assert value == pytest.approx(ref_value, rel=RTOL, abs=ATOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL, atol=ATOL)
    assert clip_frac == pytest.approx(metrics["actor/pg_clipfrac"], rel=RTOL)
    assert metrics["actor/pg_clipfrac"] > 0.1  # the clipped branches are exercised ...
    if dual_clip:
        assert metrics["actor/pg_clipfrac_lower"] > 0  # ... and so is the dual clip
    assert float(jnp.max(weights * j["mask"])) == cap  # ... and the IS cap


@pytest.mark.parametrize("mode", alg.AGGREGATIONS)
def test_gspo_matches_verl(verl, mode):
    """GSPO (codelm's ratio level "sequence") against verl's `gspo` policy loss at its recommended clip
    ranges 3e-4 / 4e-4: value, clip fraction, and the gradient, which verl and codelm both carry per token
    as sg[s_i] * pi / sg[pi] (so it is the gradient that tells a wrong detach apart)."""
    logp, old, _, adv, mask = policy_batch(5)
    logp = old + (logp - old) * 1e-3  # sequence ratios within a few 1e-4 of 1, both sides of the clip
    j = {k: jnp.asarray(v, jnp.float32) for k, v in dict(old=old, adv=adv, mask=mask).items()}

    def ours(lp):
        out = alg.ppo_clip(lp, j["old"], j["adv"], j["mask"], clip_low=3e-4, clip_high=4e-4, level="sequence")
        total, weight = alg.aggregate(out.loss, j["mask"], mode)
        return total / weight

    value, grad = codelm_loss_grad(ours, logp)
    clipped = alg.ppo_clip(jnp.asarray(logp, jnp.float32), j["old"], j["adv"], j["mask"], clip_low=3e-4,
                           clip_high=4e-4, level="sequence").clipped
    gspo = verl.core.get_policy_loss_fn("gspo")
    cfg = actor_config(verl, 3e-4, 4e-4)
    ref_value, ref_grad, metrics = verl_loss_grad(
        verl, lambda lp: gspo(tensor(verl, old), lp, tensor(verl, adv), tensor(verl, mask), mode, cfg, None), logp)

    assert value == pytest.approx(ref_value, rel=1e-4, abs=ATOL)  # float32 log-ratio means of ~1e-4
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=ATOL)
    assert float(alg.masked_mean(clipped, j["mask"])) == pytest.approx(metrics["actor/pg_clipfrac"], rel=RTOL)
    assert 0 < metrics["actor/pg_clipfrac"] < 1


def test_truncated_is_weights_match_verl(verl):
    """min(exp(old - sampler), cap) against verl's token-level TIS weights, including log ratios beyond
    verl's and codelm's +-20 safety clamp; compared on the response mask (verl zeroes padding)."""
    rng = np.random.default_rng(6)
    old, sampler = rng.normal(-2, 1.5, (4, 9)), rng.normal(-2, 1.5, (4, 9))
    sampler[0, 0], sampler[0, 1] = old[0, 0] + 30, old[0, 1] - 30
    mask = random_mask(rng, 4, 9, min_len=2)
    for cap in (1.5, 5.0):
        ours = np.asarray(alg.truncated_is_weights(jnp.asarray(old, jnp.float32), jnp.asarray(sampler, jnp.float32),
                                                   cap))
        ref, _ = verl.corr.compute_rollout_correction_weights(tensor(verl, old - sampler), tensor(verl, mask),
                                                              rollout_is="token", rollout_is_threshold=cap)
        np.testing.assert_allclose(ours * mask, ref.numpy(), rtol=RTOL, atol=1e-12)
        assert (ref.numpy() == cap).any() and (ref.numpy()[mask > 0] < cap).any()


# ---- KL, entropy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "verl_names"), [("k1", ("kl", "k1")), ("k2", ("mse", "k2")),
                                                  ("k3", ("low_var_kl", "k3"))])
def test_kl_estimators_match_verl(verl, kind, verl_names):
    """k1/k2/k3 against verl's `kl_penalty` under both of its names, value and gradient in logp (the
    KL-loss path, use_kl_loss), including k3's clamps (|log r| <= 20, value <= 10). verl's "k3+"
    (k3 value with k2's straight-through gradient) has no codelm counterpart and is not compared."""
    rng = np.random.default_rng(7)
    logp, ref = rng.normal(-2, 1, (5, 9)), rng.normal(-2, 1, (5, 9))
    ref[0, 0] = logp[0, 0] + 15  # k3 above its clamp at 10
    ref[0, 1] = logp[0, 1] + 25  # log r beyond the +-20 clamp
    weights = rng.normal(size=(5, 9))  # a random linear functional, so the gradient is checked per token
    value = np.asarray(alg.kl_estimate(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), kind))
    _, grad = codelm_loss_grad(lambda lp: jnp.sum(alg.kl_estimate(lp, jnp.asarray(ref, jnp.float32), kind) * weights),
                               logp)
    for name in verl_names:
        lp = tensor(verl, logp, grad=True)
        ref_value = verl.core.kl_penalty(lp, tensor(verl, ref), name)
        (ref_value * tensor(verl, weights)).sum().backward()
        np.testing.assert_allclose(value, ref_value.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(grad, lp.grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("mode", alg.AGGREGATIONS)
def test_entropy_matches_verl(verl, mode):
    """Per-token entropy against verl's `entropy_from_logits` (float32 both, sharp and flat logits) and,
    aggregated, against `compute_entropy_loss`."""
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 1, (4, 5, 33)).astype(np.float32)
    logits[0] *= 40.0  # nearly one-hot
    mask = random_mask(rng, 4, 5)
    ours = alg.entropy_from_logits(jnp.asarray(logits))
    torch_logits = verl.torch.tensor(logits)
    np.testing.assert_allclose(np.asarray(ours), verl.F.entropy_from_logits(torch_logits).numpy(), rtol=1e-5, atol=1e-5)
    total, weight = alg.aggregate(ours, jnp.asarray(mask, jnp.float32), mode)
    ref = verl.core.compute_entropy_loss(torch_logits, verl.torch.tensor(mask, dtype=verl.torch.float32), mode)
    assert float(total / weight) == pytest.approx(float(ref), rel=RTOL)


# ---- the whole RL loss ----------------------------------------------------------------------------------------


class FixedLogits:
    """A stand-in for the model in `rl.train.policy_loss`: returns the given logits, no auxiliary loss."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, inputs, positions, segment_ids):
        return types.SimpleNamespace(logits=self.logits, aux={})


@pytest.mark.parametrize(("ratio", "mode", "kl", "tis_cap", "dual_clip"), [
    ("token", "token-mean", "k3", 2.0, 3.0),
    ("sequence", "seq-mean-token-mean", "k2", 0.0, 0.0),
])
def test_rl_train_policy_loss_matches_verl_ppo_loss(verl, ratio, mode, kl, tis_cap, dual_clip):
    """`rl.train.policy_loss` (logits -> the RL objective) against verl's actor loss,
    `verl.workers.utils.losses.ppo_loss` lines 97-140: the policy loss with the IS weights on it,
    - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl_penalty(logp, ref)), logits divided by the
    temperature first (verl's engine does it before the log-softmax). Value and gradient in the logits.
    (ppo_loss itself takes verl's packed TensorDict batches, so its pieces are called here as it calls them.)"""
    from rl.train import RLSection, policy_loss

    rng = np.random.default_rng(9)
    n, t, v, temperature = 6, 5, 11, 0.8
    clip_low, clip_high = (0.2, 0.28) if ratio == "token" else (3e-4, 4e-4)
    rl = RLSection(init_from="unused", temperature=temperature, aggregation=mode, ratio=ratio, clip_low=clip_low,
                   clip_high=clip_high, dual_clip=dual_clip, kl_coef=0.1, kl_estimator=kl, entropy_coef=0.01,
                   tis_cap=tis_cap)
    logits = rng.normal(0, 1.5, (n, t, v))
    targets = rng.integers(0, v, (n, t))
    mask = random_mask(rng, n, t)
    logp_now = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / temperature)), targets[..., None], -1)[..., 0]
    scale = 0.6 if ratio == "token" else 1e-3
    old = logp_now + rng.normal(0, scale, (n, t))
    sampler = old + rng.normal(0, 0.4, (n, t))
    ref = logp_now + rng.normal(0, 0.5, (n, t))
    adv = rng.normal(0, 1, (n, t)) * mask
    batch = {k: jnp.asarray(x, jnp.float32) for k, x in dict(loss_mask=mask, old_logp=old, sampler_logp=sampler,
                                                             ref_logp=ref, advantages=adv).items()}
    batch.update(targets=jnp.asarray(targets), inputs=jnp.zeros((n, t), jnp.int32),
                 positions=jnp.zeros((n, t), jnp.int32), segment_ids=jnp.ones((n, t), jnp.int32))

    def ours(lg):
        out = policy_loss(FixedLogits(lg), batch, rl=rl)
        return out.total / out.weight

    value, grad = jax.value_and_grad(ours)(jnp.asarray(logits, jnp.float32))

    torch, core = verl.torch, verl.core
    cfg = actor_config(verl, clip_low, clip_high, dual_clip or NO_DUAL_CLIP)
    lg = tensor(verl, logits, grad=True)
    scaled = lg / temperature
    log_prob = torch.log_softmax(scaled, -1).gather(-1, torch.as_tensor(targets)[..., None])[..., 0]
    entropy = verl.F.entropy_from_logits(scaled)
    m = tensor(verl, mask)
    is_weights = None
    if tis_cap:
        is_weights, _ = verl.corr.compute_rollout_correction_weights(tensor(verl, old - sampler), m,
                                                                     rollout_is="token", rollout_is_threshold=tis_cap)
    pg, _ = core.get_policy_loss_fn("vanilla" if ratio == "token" else "gspo")(
        tensor(verl, old), log_prob, tensor(verl, adv), m, mode, cfg, is_weights)
    total = (pg - rl.entropy_coef * core.agg_loss(entropy, m, mode)
             + rl.kl_coef * core.agg_loss(core.kl_penalty(log_prob, tensor(verl, ref), kl), m, mode))
    total.backward()

    assert float(value) == pytest.approx(float(total.detach()), rel=1e-4, abs=ATOL)
    np.testing.assert_allclose(np.asarray(grad, np.float64), lg.grad.numpy(), rtol=1e-4, atol=ATOL)
    assert np.abs(lg.grad.numpy()).max() > 1e-3
