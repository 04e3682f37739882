"""Execution rewards: run each completion's program in the execution service over HTTP and score it.

    worker = RewardWorker(urls, mode="binary", error_reward=0.0)     # a background event loop + client
    future = worker.submit(problems, completions)                    # returns at once
    result = future.result()                                         # RewardResult, arrays [N]
    worker.close()

Programs: the problem's prompt + completion + its tests, with the HumanEval-style `check(candidate)`
rewritten so that every top-level `assert` is counted (passed / total) and the counts are printed after a
random per-call marker that the completion cannot know. So a completion that exits early (`sys.exit(0)`)
or prints a fake verdict scores 0, and "fraction" mode has the fraction of asserts that passed. Problems
whose tests have no `check` function run as given and pass when the service reports Success.

  binary    reward 1 when every test passed, else 0
  fraction  passed / total asserts

The service is called with `SandboxClient.run_many`: spread over the endpoints, retried only when the
program certainly did not run (connection refused, 503/429 before acceptance); a call that may have run
the program is never retried. Whatever fails on the service side (timeouts, 503s past the retry budget,
service errors, a dead service) gives that sample `error_reward` and is counted in `errors`; scoring
never raises. A program that ran and timed out is a failed program (reward 0), counted in `timeouts`.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import dataclasses
import secrets
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np

from evals.problems import Problem
from sandbox.api import CommandRunStatus, RunCodeRequest, RunCodeResponse, RunStatus
from sandbox.client import SandboxClient
from sandbox.retry import RetryPolicy

RewardMode = Literal["binary", "fraction"]
_MARKER = "__codelm_tests__"


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Per sample [N]: reward, whether every test passed, the fraction passed, and what went wrong."""

    rewards: np.ndarray  # float32
    passed: np.ndarray  # bool
    fraction: np.ndarray  # float32
    errors: np.ndarray  # bool: the service could not score it (reward = error_reward)
    timeouts: np.ndarray  # bool: the program ran past its time limit (reward 0)

    @property
    def n_errors(self) -> int:
        return int(self.errors.sum())


def counting_tests(tests: str, nonce: str) -> str | None:
    """`tests` with `check(candidate)`'s top-level asserts counted and the counts printed as
    "<marker><nonce> passed total" at the end of check; None when the tests have no `check`."""
    try:
        module = ast.parse(tests)
    except SyntaxError:
        return None
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None or not check.args.args:
        return None
    body: list[str] = ["    __codelm_counts = [0, 0]"]
    for stmt in check.body:
        source = ast.unparse(stmt)
        if isinstance(stmt, ast.Assert):
            body += ["    __codelm_counts[1] += 1", "    try:", *("        " + line for line in source.splitlines()),
                     "        __codelm_counts[0] += 1", "    except Exception:", "        pass"]
        else:
            body += ["    " + line for line in source.splitlines()]
    body.append(f"    print({_MARKER + nonce!r}, __codelm_counts[0], __codelm_counts[1], flush=True)")
    params = ", ".join(a.arg for a in check.args.args)
    lines: list[str] = []
    for node in module.body:
        lines += [f"def check({params}):", *body] if node is check else [ast.unparse(node)]
    return "\n".join(lines) + "\n"


def reward_program(problem: Problem, completion: str, nonce: str) -> tuple[str, bool]:
    """(program, counted): the program to run and whether it prints the counting marker."""
    tests = counting_tests(problem.tests, nonce)
    if tests is None:
        return problem.program(completion), False
    return f"{problem.setup}{problem.prompt}{completion}\n\n{tests}", True


def parse_counts(stdout: str, nonce: str) -> tuple[int, int] | None:
    """(passed, total) from the last marker line of `stdout`, None without one."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARKER + nonce):
            parts = line.split()
            try:
                return int(parts[-2]), int(parts[-1])
            except (ValueError, IndexError):
                return None
    return None


def score_response(response: RunCodeResponse, counted: bool, nonce: str) -> tuple[float, bool, bool, bool]:
    """(fraction passed, all passed, service error, timed out) of one response."""
    if response.status == RunStatus.SANDBOX_ERROR:
        return 0.0, False, True, False
    run = response.run_result
    timed_out = run is not None and run.status == CommandRunStatus.TIME_LIMIT_EXCEEDED
    if not counted:
        ok = response.status == RunStatus.SUCCESS
        return float(ok), ok, False, timed_out
    counts = parse_counts((run.stdout or "") if run is not None else "", nonce)
    if counts is None or counts[1] <= 0:
        return 0.0, False, False, timed_out
    passed, total = counts
    fraction = min(passed, total) / total
    return fraction, passed == total and response.status == RunStatus.SUCCESS, False, timed_out


async def score_completions(client: SandboxClient, problems: Sequence[Problem], completions: Sequence[str], *,
                            mode: RewardMode = "binary", error_reward: float = 0.0, run_timeout: float = 5.0,
                            memory_limit_mb: int = -1) -> RewardResult:
    """Rewards [N] of completions[i] for problems[i] (module docstring); never raises for service failures."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems for {len(completions)} completions")
    nonce = secrets.token_hex(8)
    programs = [reward_program(p, c, nonce) for p, c in zip(problems, completions)]
    requests = [RunCodeRequest(code=code, language="python", run_timeout=run_timeout, memory_limit_MB=memory_limit_mb)
                for code, _ in programs]
    try:
        responses = await client.run_many(requests)
    except Exception as e:  # noqa: BLE001  (anything the client did not turn into a SandboxError response)
        responses = [RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=f"client: {e}") for _ in requests]
    scored = [score_response(r, counted, nonce) for r, (_, counted) in zip(responses, programs)]
    fraction = np.array([s[0] for s in scored], np.float32)
    passed = np.array([s[1] for s in scored], bool)
    errors = np.array([s[2] for s in scored], bool)
    timeouts = np.array([s[3] for s in scored], bool)
    rewards = fraction if mode == "fraction" else passed.astype(np.float32)
    rewards = np.where(errors, np.float32(error_reward), rewards).astype(np.float32)
    return RewardResult(rewards, passed & ~errors, np.where(errors, 0.0, fraction).astype(np.float32), errors, timeouts)


class RewardWorker:
    """Scores batches on a background thread's event loop (one persistent client), so the trainer can
    sample the next rollouts while the service runs this batch's programs."""

    def __init__(self, urls: Sequence[str], *, mode: RewardMode = "binary", error_reward: float = 0.0,
                 run_timeout: float = 5.0, memory_limit_mb: int = -1, max_concurrency: int = 32,
                 retry_deadline_s: float = 60.0):
        if mode not in ("binary", "fraction"):
            raise ValueError(f"reward mode: {mode!r}; known: binary, fraction")
        self.mode, self.error_reward = mode, error_reward
        self.run_timeout, self.memory_limit_mb = run_timeout, memory_limit_mb
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rl-rewards", daemon=True)
        self._thread.start()
        retry = RetryPolicy(deadline_s=retry_deadline_s)
        self._client = self._run(self._make_client(list(urls), max_concurrency, retry)).result()

    async def _make_client(self, urls: list[str], max_concurrency: int, retry: RetryPolicy) -> SandboxClient:
        return SandboxClient(urls, max_concurrency=max_concurrency, retry=retry)

    def _run(self, coro) -> concurrent.futures.Future:  # noqa: ANN001
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def submit(self, problems: Sequence[Problem], completions: Sequence[str]) -> concurrent.futures.Future:
        """A future of the RewardResult of `completions` (one per problem in `problems`)."""
        return self._run(score_completions(self._client, list(problems), list(completions), mode=self.mode,
                                           error_reward=self.error_reward, run_timeout=self.run_timeout,
                                           memory_limit_mb=self.memory_limit_mb))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> RewardWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
