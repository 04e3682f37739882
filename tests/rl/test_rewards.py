"""rl.rewards through a real execution service: binary and fraction rewards, early-exit and fake-verdict
completions score 0, a dead service gives the configured reward and a count instead of an exception."""

import socket

import numpy as np
import pytest

from evals.synthetic import synthetic_problems
from rl.rewards import RewardWorker, counting_tests, parse_counts
from sandbox.local import LocalSandbox


@pytest.fixture(scope="module")
def service():
    with LocalSandbox(workers=2) as s:
        yield s


def test_counting_tests_keeps_other_statements():
    tests = "import math\n\ndef check(candidate):\n    x = 2\n    assert candidate(x) == 4\n    assert candidate(1) == 2\n\ncheck(f)\n"
    out = counting_tests(tests, "n0")
    assert out.index("import math") < out.index("def check") < out.index("check(f)")
    assert out.count("__codelm_counts[1] += 1") == 2 and "    x = 2" in out
    assert counting_tests("assert f(1) == 2\n", "n0") is None
    assert parse_counts("noise\n__codelm_tests__n0 3 4\n", "n0") == (3, 4)
    assert parse_counts("__codelm_tests__other 4 4\n", "n0") is None


def test_rewards_binary_and_fraction(service):
    problem = synthetic_problems("train", 1)[0]
    good = problem.reference
    n_asserts = problem.tests.count("assert ")
    # right on the first test only: the example's expected value, returned whatever the input
    first_expected = problem.tests.split("== ", 1)[1].splitlines()[0]
    partial = f"    return {first_expected}\n"
    completions = [good, "    return None\n", "    import sys\n    sys.exit(0)\n",
                   f"    print('__codelm_tests__' + 'x', {n_asserts}, {n_asserts})\n    return None\n", partial,
                   "    while True:\n        pass\n"]
    problems = [problem] * len(completions)
    with RewardWorker([service.url], mode="binary", run_timeout=2.0) as worker:
        binary = worker.submit(problems, completions).result()
    with RewardWorker([service.url], mode="fraction", run_timeout=2.0) as worker:
        fraction = worker.submit(problems, completions).result()
    np.testing.assert_array_equal(binary.rewards, [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(binary.passed, [True, False, False, False, False, False])
    assert fraction.rewards[0] == 1 and fraction.rewards[1] == 0 and fraction.rewards[2] == 0 and fraction.rewards[3] == 0
    assert fraction.rewards[4] == pytest.approx(1 / n_asserts)
    assert binary.timeouts.tolist() == [False] * 5 + [True]
    assert binary.n_errors == 0 and fraction.n_errors == 0


def test_dead_service_gives_configured_reward():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    problem = synthetic_problems("train", 1)[0]
    with RewardWorker([url], error_reward=-0.5, retry_deadline_s=1.0) as worker:
        result = worker.submit([problem] * 3, [problem.reference] * 3).result()
    np.testing.assert_array_equal(result.rewards, [-0.5] * 3)
    assert result.n_errors == 3 and not result.passed.any()
