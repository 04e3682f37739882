"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
Code", eq. 1): with n samples of which c pass,

    pass@k = 1 - C(n - c, k) / C(n, k),

the probability that at least one of k samples drawn without replacement from the n passes. It is
evaluated as a running product, 1 - prod_{i = n-c+1}^{n} (1 - k / i), which avoids huge binomials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem from n samples, c of them correct. Requires 0 <= c <= n and 1 <= k <= n."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem, as reported for a benchmark."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems to average over")
    return sum(values) / len(values)


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean change of a per-problem score between two checkpoints on the same problems, and its standard
    error from the per-problem differences (a paired comparison: which problems are hard cancels out)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"need the same non-empty problem set, got {len(before)} and {len(after)} scores")
    diffs = [b - a for a, b in zip(before, after)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) == 1:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))
