"""A program the sandbox cannot execute is scored as not passed and counted; the run goes on."""

import asyncio

import httpx
import pytest

from evals.harness import EvaluationError, evaluate
from evals.problems import load_problems
from sandbox.client import SandboxClient


class FailingFor(httpx.AsyncHTTPTransport):
    """The real transport, except that requests whose body holds `marker` lose their connection."""

    def __init__(self, marker: bytes):
        super().__init__()
        self.marker = marker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.marker in request.content:
            raise httpx.ReadError("connection lost", request=request)
        return await super().handle_async_request(request)


def score(service, problems, marker: bytes):
    async def session():
        async with SandboxClient(service.url, transport=FailingFor(marker)) as client:
            completions = {p.task_id: [p.reference] for p in problems}
            return await evaluate(problems, completions, client, ks=(1,), progress=False)

    return asyncio.run(session())


def test_one_sandbox_error_is_scored_and_counted(service):
    problems = load_problems()[:4]
    check_call = problems[1].program(problems[1].reference).strip().splitlines()[-1]  # check(<entry point>)
    report = score(service, problems, marker=check_call.encode())
    assert [p.correct for p in report.problems] == [1, 0, 1, 1]
    assert report.summary()["outcomes"] == {"passed": 3, "failed": 0, "timeout": 0, "error": 1}
    (failed,) = report.problems[1].samples
    assert failed.outcome == "error" and "ReadError" in failed.detail
    assert report.pass_at_k() == {"pass@1": 0.75}


def test_a_run_where_nothing_executes_is_an_error(service):
    with pytest.raises(EvaluationError, match="all 2 programs"):
        score(service, load_problems()[:2], marker=b"")
