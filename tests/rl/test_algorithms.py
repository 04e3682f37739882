"""rl.algorithms against hand-computed values and against verl's formulas.

verl (0.9.1, `verl/trainer/ppo/core_algos.py`) cannot be installed here as a test dependency: it imports
ray, tensordict and omegaconf at module level and pins transformers < 5.11 (this project has 5.24), so
`pip install verl` cannot resolve and `--no-deps` cannot import it. Tunix (google-tunix 0.1.7) pulls
tensorflow-datasets, grain, qwix, metrax and kagglehub. So nothing is vendored: the `verl_*` functions
below are independent numpy transcriptions of verl 0.9.1's code, one per function, citing its lines, and
rl.algorithms (jax/numpy, written separately) is compared with them on the same random tensors.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import algorithms as alg

# ---- verl 0.9.1 transcriptions (numpy) -------------------------------------------------------------------


def verl_masked_whiten(values, mask):
    """verl/utils/torch_functional.py:294-346 (masked_mean, masked_var unbiased, masked_whiten)."""
    mean = (values * mask).sum() / (mask.sum() + 1e-8)
    var = (np.square(values - mean) * mask).sum() / (mask.sum() + 1e-8)
    var = var * mask.sum() / (mask.sum() - 1)
    return (values - mean) / np.sqrt(var + 1e-8)


def verl_grpo(scores, mask, index, eps=1e-6, norm_by_std=True):
    """core_algos.py:268-331 compute_grpo_outcome_advantage (torch.std is unbiased)."""
    groups = defaultdict(list)
    for i, idx in enumerate(index):
        groups[idx].append(scores[i])
    out = scores.copy()
    for i, idx in enumerate(index):
        g = np.array(groups[idx])
        mean, std = (0.0, 1.0) if len(g) == 1 else (g.mean(), g.std(ddof=1))
        out[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return out[:, None] * mask


def verl_rloo(scores, mask, index):
    """core_algos.py:588-636 compute_rloo_outcome_advantage."""
    groups = defaultdict(list)
    for i, idx in enumerate(index):
        groups[idx].append(scores[i])
    out = scores.copy()
    for i, idx in enumerate(index):
        n = len(groups[idx])
        if n > 1:
            mean = np.mean(groups[idx])
            out[i] = scores[i] * n / (n - 1) - mean * n / (n - 1)
    return out[:, None] * mask


def verl_reinforce_pp_baseline(scores, mask, index):
    """core_algos.py:536-584 compute_reinforce_plus_plus_baseline_outcome_advantage."""
    groups = defaultdict(list)
    for i, idx in enumerate(index):
        groups[idx].append(scores[i])
    out = scores.copy()
    for i, idx in enumerate(index):
        out[i] = scores[i] - (0.0 if len(groups[idx]) == 1 else np.mean(groups[idx]))
    tiled = np.tile(out[:, None], (1, mask.shape[1])) * mask
    return verl_masked_whiten(tiled, mask) * mask


def verl_reinforce_pp(token_rewards, mask, gamma=1.0):
    """core_algos.py:694-731 compute_reinforce_plus_plus_outcome_advantage."""
    returns = np.zeros_like(token_rewards)
    running = np.zeros(token_rewards.shape[0])
    for t in reversed(range(token_rewards.shape[1])):
        new = token_rewards[:, t] + gamma * running
        returns[:, t] = new * mask[:, t]
        running = new * mask[:, t] + running * (1 - mask[:, t])
    return verl_masked_whiten(returns, mask) * mask


def verl_agg_loss(loss_mat, mask, mode):
    """core_algos.py:1140-1207 agg_loss (dp_size 1; seq-mean-token-sum-norm's default factor: T)."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq = (loss_mat * mask).sum(-1)
        seq_mask = (mask.sum(-1) > 0).astype(float)
        loss = (seq * seq_mask).sum() / seq_mask.sum()
        return loss / mask.shape[-1] if mode.endswith("norm") else loss
    if mode == "seq-mean-token-mean":
        count = mask.sum(-1)
        seq = (loss_mat * mask).sum(-1) / (count + 1e-8)
        seq_mask = (count > 0).astype(float)
        return (seq * seq_mask).sum() / seq_mask.sum()
    raise ValueError(mode)


def verl_vanilla_policy_loss(old_logp, logp, adv, mask, mode, clip_low, clip_high, clip_c=3.0, is_weights=None):
    """core_algos.py:1286-1376 compute_policy_loss_vanilla (dual-clip with clip_ratio_c)."""
    neg_kl = np.clip(logp - old_logp, -20.0, 20.0)
    ratio = np.exp(neg_kl)
    l1 = -adv * ratio
    l2 = -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = np.maximum(l1, l2)
    clipfrac = ((l2 > l1) * mask).sum() / (mask.sum() + 1e-8)
    clip2 = np.minimum(-adv * clip_c, clip1)
    losses = np.where(adv < 0, clip2, clip1)
    if is_weights is not None:
        losses = losses * is_weights
    return verl_agg_loss(losses, mask, mode), clipfrac


def verl_gspo_loss_value(old_logp, logp, adv, mask, mode, clip_low, clip_high):
    """core_algos.py:1546-1619 compute_policy_loss_gspo (forward value; the detach only shapes gradients)."""
    neg_kl = logp - old_logp
    lengths = np.maximum(mask.sum(-1), 1)
    seq = (neg_kl * mask).sum(-1) / lengths
    log_ratio = np.minimum(logp - logp + seq[:, None], 10.0)
    ratio = np.exp(log_ratio)
    losses = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_low, 1 + clip_high))
    return verl_agg_loss(losses, mask, mode)


def verl_kl(logp, ref_logp, kind):
    """core_algos.py:2216-2251 kl_penalty_forward."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * np.square(logp - ref_logp)
    kl = np.clip(ref_logp - logp, -20, 20)
    return np.clip(np.exp(kl) - kl - 1, -10, 10)


# ---- fixtures ---------------------------------------------------------------------------------------------


def random_batch(seed=0, p=3, g=4, t=6):
    rng = np.random.default_rng(seed)
    rewards = rng.integers(0, 2, (p, g)).astype(np.float64) + rng.normal(0, 0.1, (p, g))
    lengths = rng.integers(1, t + 1, (p, g))
    mask = (np.arange(t)[None, None, :] < lengths[..., None]).astype(np.float64)
    return rewards, mask


def agg(loss, mask, mode):
    total, weight = alg.aggregate(jnp.asarray(loss, jnp.float32), jnp.asarray(mask, jnp.float32), mode)
    return float(total / weight)


# ---- hand-computed values ------------------------------------------------------------------------------


def test_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0]])
    mask = np.ones((1, 4, 2))
    std = np.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    np.testing.assert_allclose(alg.advantages("grpo", rewards, mask)[0, :, 0], [0.5 / (std + 1e-6), -0.5 / (std + 1e-6),
                               -0.5 / (std + 1e-6), 0.5 / (std + 1e-6)], rtol=1e-6)
    np.testing.assert_allclose(alg.advantages("drgrpo", rewards, mask)[0, :, 1], [0.5, -0.5, -0.5, 0.5])
    # RLOO: baseline = mean of the other three: 1 - 1/3, 0 - 2/3
    np.testing.assert_allclose(alg.advantages("rloo", rewards, mask)[0, :, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    # all equal: no signal under any group baseline
    flat = np.ones((1, 4))
    for name in ("grpo", "drgrpo", "rloo"):
        assert np.all(alg.advantages(name, flat, mask) == 0)


def test_reinforce_pp_by_hand():
    rewards = np.array([[1.0, 0.0]])
    mask = np.array([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    # REINFORCE++: returns (1, 1, 0 | 0): token mean 2/3, unbiased var over 3 tokens = 1/3
    out = alg.advantages("reinforce++", rewards, mask)
    expected = (np.array([1.0, 1.0, 0.0]) - 2 / 3) / np.sqrt(1 / 3 + 1e-8)
    np.testing.assert_allclose(out[0, 0, :2], expected[:2], rtol=1e-5)
    np.testing.assert_allclose(out[0, 1, 0], expected[2], rtol=1e-5)
    assert out[0, 0, 2] == 0 and out[0, 1, 1] == 0
    # baseline: (0.5, 0.5 | -0.5): mean 1/6, var = ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3
    base = alg.advantages("reinforce++_baseline", rewards, mask)
    np.testing.assert_allclose(base[0, 0, 0], (0.5 - 1 / 6) / np.sqrt(1 / 3 + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(base[0, 1, 0], (-0.5 - 1 / 6) / np.sqrt(1 / 3 + 1e-8), rtol=1e-5)


def test_aggregation_by_hand():
    loss = np.array([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the third sequence is fully masked
    assert agg(loss, mask, "token-mean") == pytest.approx(6 / 3)
    assert agg(loss, mask, "seq-mean-token-mean") == pytest.approx((1.5 + 3) / 2)
    assert agg(loss, mask, "seq-mean-token-sum") == pytest.approx((3 + 3) / 2)
    assert agg(loss, mask, "seq-mean-token-sum-norm") == pytest.approx(6 / (2 * 3))
    with pytest.raises(ValueError, match="aggregation"):
        alg.aggregate(jnp.asarray(loss), jnp.asarray(mask), "mean")


def test_aggregation_splits_over_micro_batches():
    """Sums and weights of two halves give the whole batch's value (the train step's convention)."""
    rng = np.random.default_rng(1)
    loss, mask = rng.normal(size=(6, 5)), (rng.random((6, 5)) < 0.7).astype(float)
    for mode in alg.AGGREGATIONS:
        a = alg.aggregate(jnp.asarray(loss[:3]), jnp.asarray(mask[:3]), mode)
        b = alg.aggregate(jnp.asarray(loss[3:]), jnp.asarray(mask[3:]), mode)
        assert float((a[0] + b[0]) / (a[1] + b[1])) == pytest.approx(agg(loss, mask, mode), rel=1e-5)


def test_ppo_clip_by_hand():
    # ratios e^0.5 = 1.65 and e^-0.5 = 0.61 with clip_low 0.2, clip_high 0.28 (DAPO's clip-higher)
    logp = jnp.array([[0.5, -0.5, 0.5, -0.5]])
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    out = alg.ppo_clip(logp, old, adv, jnp.ones((1, 4)), clip_low=0.2, clip_high=0.28)
    r = np.exp([0.5, -0.5])
    # A > 0: min(r, 1.28) taken as -A*min => loss -1.28 (clipped), -0.61 (unclipped)
    # A < 0: loss max(r, 0.8): 1.65 (unclipped), 0.8 (clipped)
    np.testing.assert_allclose(np.asarray(out.loss[0]), [-1.28, -r[1], r[0], 0.8], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.clipped[0]), [1, 0, 0, 1])
    dual = alg.ppo_clip(jnp.array([[2.0]]), jnp.zeros((1, 1)), jnp.array([[-1.0]]), jnp.ones((1, 1)), clip_low=0.2,
                        clip_high=0.2, dual_clip=3.0)
    assert float(dual.loss[0, 0]) == pytest.approx(3.0)  # e^2 = 7.4 bounded by c = 3


def test_soft_overlong_penalty_and_dynamic_sampling():
    # DAPO eq. 13 with L_max 20, L_cache 4: 0 up to 16, then -(len - 16) / 4, -1 beyond 20
    np.testing.assert_allclose(alg.soft_overlong_penalty(np.array([10, 16, 17, 20, 21]), 20, 4),
                               [0, 0, -0.25, -1, -1])
    pools = [np.array([[1, 1], [0, 1], [0, 0]]), np.array([[1, 0], [1, 1], [0, 1]])]
    np.testing.assert_array_equal(alg.zero_variance_groups(pools[0]), [True, False, True])
    assert alg.select_groups(pools, 2) == [(0, 1), (1, 0)]
    assert alg.select_groups(pools, 5) == [(0, 1), (1, 0), (1, 2)]  # all there is


def test_truncated_is_weights():
    w = alg.truncated_is_weights(jnp.log(jnp.array([0.5, 0.2, 0.9])), jnp.log(jnp.array([0.25, 0.4, 0.1])), cap=2.0)
    np.testing.assert_allclose(np.asarray(w), [2.0, 0.5, 2.0], rtol=1e-6)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="estimator"):
        alg.advantages("ppo", np.ones((1, 2)), np.ones((1, 2, 1)))
    with pytest.raises(ValueError, match="kl estimator"):
        alg.kl_estimate(jnp.zeros(1), jnp.zeros(1), "k4")


# ---- against verl's formulas ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_match_verl(seed):
    rewards, mask = random_batch(seed)
    p, g, t = mask.shape
    flat_r, flat_m = rewards.reshape(-1), mask.reshape(p * g, t)
    index = np.repeat(np.arange(p), g)
    ours = {name: alg.advantages(name, rewards, mask).reshape(p * g, t) for name in alg.ESTIMATORS}
    np.testing.assert_allclose(ours["grpo"], verl_grpo(flat_r, flat_m, index), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["drgrpo"], verl_grpo(flat_r, flat_m, index, norm_by_std=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["rloo"], verl_rloo(flat_r, flat_m, index), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["reinforce++_baseline"], verl_reinforce_pp_baseline(flat_r, flat_m, index),
                               rtol=1e-5, atol=1e-6)
    # REINFORCE++'s outcome reward sits on the last response token (verl's token_level_rewards)
    token_rewards = np.zeros_like(flat_m)
    token_rewards[np.arange(p * g), flat_m.sum(-1).astype(int) - 1] = flat_r
    np.testing.assert_allclose(ours["reinforce++"], verl_reinforce_pp(token_rewards, flat_m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", alg.AGGREGATIONS)
def test_policy_losses_match_verl(mode):
    rng = np.random.default_rng(3)
    n, t = 8, 7
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, (n, 1))).astype(np.float64)
    mask[2] = 0  # a fully masked sequence (an overlong-filtered one)
    old = rng.normal(-1.5, 0.5, (n, t))
    logp = old + rng.normal(0, 0.3, (n, t))
    adv = rng.normal(0, 1, (n, t)) * mask
    is_w = np.minimum(np.exp(rng.normal(0, 0.2, (n, t))), 2.0)
    j = {k: jnp.asarray(v, jnp.float32) for k, v in dict(logp=logp, old=old, adv=adv, mask=mask, w=is_w).items()}

    out = alg.ppo_clip(j["logp"], j["old"], j["adv"], j["mask"], clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    ref, ref_clipfrac = verl_vanilla_policy_loss(old, logp, adv, mask, mode, 0.2, 0.28, is_weights=is_w)
    assert agg(np.asarray(out.loss) * is_w, mask, mode) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert float(alg.masked_mean(out.clipped, j["mask"])) == pytest.approx(ref_clipfrac, rel=1e-5)

    gspo = alg.ppo_clip(j["logp"], j["old"], j["adv"], j["mask"], clip_low=3e-4, clip_high=4e-4, level="sequence")
    ref = verl_gspo_loss_value(old, logp, adv, mask, mode, 3e-4, 4e-4)
    assert agg(np.asarray(gspo.loss), mask, mode) == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", alg.KL_ESTIMATORS)
def test_kl_estimators_match_verl(kind):
    rng = np.random.default_rng(4)
    logp, ref = rng.normal(-2, 1, (5, 9)), rng.normal(-2, 1, (5, 9))
    ref[0, 0] = logp[0, 0] + 15  # k3's clamp at 10
    np.testing.assert_allclose(np.asarray(alg.kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind)),
                               verl_kl(logp, ref, kind), rtol=1e-5, atol=1e-6)


# ---- properties ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", alg.AGGREGATIONS)
def test_clipped_gradient_equals_policy_gradient_on_policy(level, mode):
    """With the policy equal to the old policy the clipped surrogate's gradient is the plain policy
    gradient -A grad log pi (aggregated the same way), for token (PPO) and sequence (GSPO) ratios."""
    rng = np.random.default_rng(5)
    n, t, v = 4, 5, 7
    logits = jnp.asarray(rng.normal(size=(n, t, v)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, v, (n, t)))
    mask = jnp.asarray((np.arange(t)[None] < rng.integers(1, t + 1, (n, 1))).astype(np.float32))
    adv = jnp.asarray(rng.normal(size=(n, t)), jnp.float32) * mask

    def logp_of(theta):
        return jnp.take_along_axis(jax.nn.log_softmax(theta, -1), actions[..., None], -1)[..., 0]

    old = jax.lax.stop_gradient(logp_of(logits))

    def clipped(theta):
        out = alg.ppo_clip(logp_of(theta), old, adv, mask, clip_low=0.2, clip_high=0.28, level=level)
        total, weight = alg.aggregate(out.loss, mask, mode)
        return total / weight

    def plain(theta):
        total, weight = alg.aggregate(-adv * logp_of(theta), mask, mode)
        return total / weight

    g_clip, g_plain = jax.grad(clipped)(logits), jax.grad(plain)(logits)
    assert float(jnp.abs(g_plain).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(g_clip), np.asarray(g_plain), rtol=1e-5, atol=1e-7)


def test_k3_is_nonnegative_and_unbiased_for_categorical_kl():
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(6))
    q = rng.dirichlet(np.ones(6))
    exact = float(np.sum(p * (np.log(p) - np.log(q))))
    logp, logq = jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))
    k3 = np.asarray(alg.kl_estimate(logp, logq, "k3"))
    assert np.all(k3 >= 0)
    assert float(np.sum(p * k3)) == pytest.approx(exact, rel=1e-5)  # the expectation, summed exactly
    assert float(np.sum(p * np.asarray(alg.kl_estimate(logp, logq, "k1")))) == pytest.approx(exact, rel=1e-5)
    # ... and by sampling: the Monte Carlo mean is within 4 standard errors of the exact KL
    draws = rng.choice(6, size=200_000, p=p)
    samples = k3[draws]
    assert abs(samples.mean() - exact) < 4 * samples.std() / np.sqrt(len(samples))
    wide = np.asarray(alg.kl_estimate(jnp.asarray(rng.normal(0, 3, 1000)), jnp.asarray(rng.normal(0, 3, 1000)), "k3"))
    assert wide.min() >= 0


def test_entropy_from_logits():
    probs = np.array([0.5, 0.25, 0.25])
    assert float(alg.entropy_from_logits(jnp.log(jnp.asarray(probs)))) == pytest.approx(-np.sum(probs * np.log(probs)))
