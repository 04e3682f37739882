"""rl.algorithms against hand-computed values and properties (the on-policy gradient, k3's unbiasedness).
Comparisons with verl's own code on the same tensors are in test_verl_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import algorithms as alg

# ---- fixtures ---------------------------------------------------------------------------------------------


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
    for bad in (-2.0, 0.5, 1.0):  # verl asserts clip_ratio_c > 1 too
        with pytest.raises(ValueError, match="dual_clip"):
            alg.ppo_clip(logp, old, adv, jnp.ones((1, 4)), clip_low=0.2, clip_high=0.2, dual_clip=bad)


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
