"""Async client (httpx) for codelm's execution service and for SandboxFusion deployments.

    async with SandboxClient(["http://sandbox-a:8080", "http://sandbox-b:8080"], max_concurrency=64) as client:
        responses = await client.run_many([RunCodeRequest(code=..., language="python"), ...])
        verdict = await client.run_tests(RunTestsRequest(code=..., language="cpp", test_cases=[...]))

Calls are spread over the endpoints (`sandbox.endpoints`) and retried only when the program certainly
did not run (`sandbox.retry`): connection refused, or 503/429 before acceptance; an endpoint that
goes away (refusing connections, or draining: 503 until it stops) stops getting requests. A failure after the request went out raises `SandboxClientError`
with `may_have_run=True` and is not retried. `run_tests` uses codelm's `/run_tests` batch endpoint and
falls back to one `/run_code` per test case against servers without it (SandboxFusion), with the same
pass/fail rule. Results come back in request order.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pydantic

from sandbox.api import (
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
    RunTestsRequest,
    RunTestsResponse,
    TestCaseResult,
    stdout_matches,
)
from sandbox.endpoints import Endpoint, EndpointPool
from sandbox.retry import SAFE_STATUS, RetryPolicy, is_safe_error, retry_after

REQUEST_ID_HEADER = "X-Request-Id"
_GET_HEADERS = ((b"accept", b"application/json"),)
_JSON_HEADERS = (*_GET_HEADERS, (b"content-type", b"application/json"))
# Below the service's idle limits (keep-alive timeout, and sandbox.bounds.DRAIN_IDLE_S when it stops),
# so the service never closes a connection this client is about to reuse.
_KEEPALIVE_EXPIRY_S = 2.0


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process: building one loads the CA bundle (~20 ms), which httpx
    would otherwise do for every client, https or not."""
    return ssl.create_default_context()


class SandboxClientError(Exception):
    """A call failed for good: retries exhausted, the service rejected the request (4xx), or the
    connection failed after the request was sent. `status` is the last HTTP status (None when no
    response came), `detail` the service's reason, `may_have_run` whether the program may have run."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None, *, may_have_run: bool = False):
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.may_have_run = may_have_run


class SandboxClient:
    """base_url: one service URL or several (requests are spread over them).
    max_concurrency: requests in flight at once (set it near the services' workers + queue).
    timeout_margin_s: added to a request's own compile and run timeouts to bound one HTTP call,
    covering queueing on the server."""

    def __init__(self, base_url: str | Sequence[str] = "http://127.0.0.1:8080", *, max_concurrency: int = 32,
                 retry: RetryPolicy = RetryPolicy(), timeout_margin_s: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.endpoints = EndpointPool(urls)
        self.base_url = self.endpoints.endpoints[0].url
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency,
                              keepalive_expiry=_KEEPALIVE_EXPIRY_S)
        # Requests go straight to the transport (httpx's connection pool): the AsyncClient layers above
        # it (cookies, auth, redirects, header and URL merging) cost about as much CPU per call as the
        # transport itself, and this client needs none of them.
        self._transport = transport or httpx.AsyncHTTPTransport(verify=_tls_context(), limits=limits)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._retry = retry
        self._margin = timeout_margin_s
        self._has_run_tests: bool | None = None  # learnt on first use

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.aclose()

    # -- endpoints ----------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether an endpoint answers SandboxFusion's liveness probe."""
        try:
            response = await self._call("GET", "/v1/ping", None, timeout_s=10.0, policy=RetryPolicy(max_attempts=1))
            return response.json() == "pong"
        except SandboxClientError:
            return False

    async def health(self) -> dict[str, Any]:
        return (await self._call("GET", "/health", None, timeout_s=30.0)).json()

    async def run_code(self, request: RunCodeRequest, *, request_id: str | None = None) -> RunCodeResponse:
        timeout = request.compile_timeout + request.run_timeout + self._margin
        response = await self._call("POST", "/run_code", request.model_dump_json().encode(), timeout_s=timeout,
                                    request_id=request_id)
        return RunCodeResponse.model_validate_json(response.content)

    async def run_many(self, requests: Sequence[RunCodeRequest],
                       progress: Callable[[int, int], None] | None = None) -> list[RunCodeResponse]:
        """Run every request concurrently (bounded by max_concurrency); results in request order.
        A request whose call fails for good comes back as a `SandboxError` response whose message
        says why, so one failure never hides the other results. `progress(done, total)` is called as
        results arrive."""
        done = 0

        async def one(request: RunCodeRequest) -> RunCodeResponse:
            nonlocal done
            try:
                response = await self.run_code(request)
            except SandboxClientError as e:
                response = RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=f"client: {e}")
            done += 1
            if progress is not None:
                progress(done, len(requests))
            return response

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def run_tests(self, request: RunTestsRequest) -> RunTestsResponse:
        if self._has_run_tests is not False:
            timeout = request.compile_timeout + request.run_timeout * len(request.test_cases) + self._margin
            try:
                response = await self._call("POST", "/run_tests", request.model_dump_json().encode(),
                                            timeout_s=timeout)
                self._has_run_tests = True
                return RunTestsResponse.model_validate_json(response.content)
            except SandboxClientError as e:
                if e.status != 404:
                    raise
                self._has_run_tests = False
        return await self._run_tests_one_by_one(request)

    async def _run_tests_one_by_one(self, request: RunTestsRequest) -> RunTestsResponse:
        """`/run_tests` on a server that only has `/run_code`: same verdicts, one compile per case."""
        async def judge(index: int) -> tuple[TestCaseResult, RunCodeResponse]:
            case = request.test_cases[index]
            response = await self.run_code(request.single_run(case))
            run = response.run_result
            passed = response.status == RunStatus.SUCCESS and run is not None and (
                case.expected_stdout is None
                or stdout_matches(run.stdout or "", case.expected_stdout, request.output_match))
            return TestCaseResult(passed=passed, run_result=run), response

        if request.stop_on_first_failure:
            judged: list[tuple[TestCaseResult, RunCodeResponse]] = []
            for index in range(len(request.test_cases)):
                judged.append(await judge(index))
                if not judged[-1][0].passed:
                    break
        else:
            judged = list(await asyncio.gather(*(judge(i) for i in range(len(request.test_cases)))))
        results = [result for result, _ in judged]
        results += [TestCaseResult(passed=False) for _ in range(len(request.test_cases) - len(results))]
        responses = [response for _, response in judged]
        if any(r.status == RunStatus.SANDBOX_ERROR for r in responses):
            status = RunStatus.SANDBOX_ERROR
        else:
            status = RunStatus.SUCCESS if all(r.passed for r in results) else RunStatus.FAILED
        compile_result = responses[0].compile_result if responses else None
        if compile_result is not None and not compile_result.succeeded:
            results = [TestCaseResult(passed=False) for _ in request.test_cases]
        message = "; ".join(r.message for r in responses if r.message)
        return RunTestsResponse(status=status, message=message, compile_result=compile_result, test_results=results)

    # -- transport ----------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: bytes | None, *, timeout_s: float,
                    policy: RetryPolicy | None = None, request_id: str | None = None) -> httpx.Response:
        """One logical call: attempts on the endpoints until an answer, a refusal that may not be
        retried, or the retry budget is spent. Every attempt carries the same X-Request-Id."""
        policy = policy or self._retry
        headers = [*(_JSON_HEADERS if body is not None else _GET_HEADERS),
                   (b"x-request-id", (request_id or uuid.uuid4().hex).encode())]
        timeout = {"connect": min(timeout_s, 10.0), "read": timeout_s, "write": timeout_s, "pool": timeout_s}
        deadline = time.monotonic() + policy.deadline_s
        tried: set[str] = set()  # endpoints refused in this round
        waits: list[float] = []  # what each refusal of this round asked for (Retry-After; 0 without one)
        last_error, last_status, last_detail = "no attempt made", None, None
        for attempt in range(policy.max_attempts):
            response, error = None, None
            # The endpoint is picked once a concurrency slot is free: while this call waited for one, an
            # endpoint may have refused others (a draining one, say), and must not get this request.
            async with self._slots:
                endpoint = self.endpoints.pick(tried)
                tried.add(endpoint.url)
                try:
                    response = await self._attempt(endpoint, method, path, body, headers, timeout)
                except httpx.HTTPError as e:
                    error = e
            if error is not None:
                if not is_safe_error(error):
                    raise SandboxClientError(f"{method} {path} to {endpoint.url}: {type(error).__name__}: {error} "
                                             "(after the request was sent: not retried)", may_have_run=True) from error
                self.endpoints.mark_down(endpoint)
                last_error, last_status, last_detail = f"{type(error).__name__}: {error}", None, None
                waits.append(0.0)
            else:
                if response.status_code == 200:
                    return response
                last_status, last_detail = response.status_code, _detail(response)
                if response.status_code not in SAFE_STATUS:
                    raise SandboxClientError(f"{method} {path} to {endpoint.url}: HTTP {response.status_code}: "
                                             f"{last_detail}", response.status_code, last_detail)
                # Busy or draining: prefer the others for a while, and this one not before its Retry-After
                # (a draining service's Retry-After lasts until its listener is closed).
                wait = retry_after(response)
                self.endpoints.mark_down(endpoint, wait)
                last_error = f"HTTP {response.status_code}: {last_detail}"
                waits.append(wait or 0.0)
            if attempt == policy.max_attempts - 1 or time.monotonic() >= deadline:
                break
            if not self.endpoints.any_up(tried):  # every endpoint refused: back off, then a new round
                tried.clear()
                wait, waits = min(waits), []  # until the first endpoint may take requests again
                await asyncio.sleep(min(policy.delay(attempt, wait), max(0.0, deadline - time.monotonic())))
        urls = ", ".join(e.url for e in self.endpoints.endpoints)
        raise SandboxClientError(f"{method} {path} to {urls}: gave up after {attempt + 1} attempts; last: {last_error}",
                                 last_status, last_detail)

    async def _attempt(self, endpoint: Endpoint, method: str, path: str, body: bytes | None,
                       headers: list[tuple[bytes, bytes]], timeout: dict[str, float]) -> httpx.Response:
        """One HTTP exchange, the whole response read (a failure while reading it raises httpx's
        ReadError & co., never retried). The caller holds a concurrency slot."""
        started = time.monotonic()
        endpoint.in_flight += 1
        try:
            request = httpx.Request(method, endpoint.url + path, content=body, headers=headers,
                                    extensions={"timeout": timeout})
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        finally:
            endpoint.in_flight -= 1
        if response.status_code not in SAFE_STATUS:
            self.endpoints.mark_up(endpoint, started)
        return response


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail")
    except (ValueError, AttributeError, pydantic.ValidationError):
        return response.text[:500]
