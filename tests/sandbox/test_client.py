"""Bounded queue and the client's retry policy, endpoint spreading, batching and SandboxFusion fallback."""

import asyncio
import contextlib
import socket
import time

import fastapi
import httpx
import pytest
import uvicorn

from sandbox.api import RunCodeRequest, RunCodeResponse, RunStatus, RunTestsRequest, TestCase
from sandbox.client import SandboxClient, SandboxClientError
from sandbox.endpoints import EndpointPool
from sandbox.local import LocalSandbox
from sandbox.retry import RetryPolicy

SLEEP = RunCodeRequest(code="import time\ntime.sleep(2.5)\nprint('slept')", language="python")


@pytest.fixture(scope="module")
def tiny_service():
    """One worker, one queue place: the third concurrent request finds the service full."""
    with LocalSandbox(workers=1, max_queue=1) as running:
        yield running


def test_full_queue_is_refused_at_once(tiny_service):
    async def scenario():
        async with SandboxClient(tiny_service.url, retry=RetryPolicy(max_attempts=1)) as client:
            running = asyncio.create_task(client.run_code(SLEEP))
            queued = asyncio.create_task(client.run_code(SLEEP))
            while (pool := (await client.health())["pool"])["running"] + pool["queued"] < 2:
                await asyncio.sleep(0.01)  # until one request runs and the other waits
            started = time.monotonic()
            with pytest.raises(SandboxClientError) as refused:
                await client.run_code(SLEEP)
            refusal_time = time.monotonic() - started
            return refused.value, refusal_time, await running, await queued

    refused, refusal_time, running, queued = asyncio.run(scenario())
    assert refused.status == 503 and "server busy" in str(refused.detail)
    assert refusal_time < 1.0  # answered at once, not after the 2.5 s requests ahead of it
    assert running.run_result.stdout == queued.run_result.stdout == "slept\n"


def test_client_backs_off_until_the_service_has_room(tiny_service):
    async def scenario():
        async with SandboxClient(tiny_service.url, retry=RetryPolicy(max_attempts=20, base_delay_s=0.05)) as client:
            rejected_before = (await client.health())["pool"]["rejected"]
            requests = [RunCodeRequest(code=f"import time\ntime.sleep(0.2)\nprint({i})", language="python") for i in range(5)]
            responses = await client.run_many(requests)
            return responses, (await client.health())["pool"]["rejected"] - rejected_before

    responses, rejected = asyncio.run(scenario())
    assert [r.run_result.stdout for r in responses] == [f"{i}\n" for i in range(5)]
    assert rejected > 0  # some attempts were refused and retried


def test_a_queued_request_whose_client_leaves_gives_its_place_back(tiny_service):
    async def scenario():
        async with SandboxClient(tiny_service.url, retry=RetryPolicy(max_attempts=1)) as client:
            running = asyncio.create_task(client.run_code(SLEEP))
            while (await client.health())["pool"]["running"] < 1:
                await asyncio.sleep(0.01)
            leaving = asyncio.create_task(client.run_code(SLEEP))
            while (await client.health())["pool"]["queued"] < 1:
                await asyncio.sleep(0.01)
            leaving.cancel()  # closes its connection
            while (await client.health())["pool"]["queued"] > 0:
                await asyncio.sleep(0.01)
            await running
            after = await client.run_code(RunCodeRequest(code="print('next')", language="python"))
            return after, (await client.health())["pool"]

    after, pool = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert after.run_result.stdout == "next\n"
    assert pool["running"] == pool["queued"] == 0


def test_run_many_keeps_order_and_reports_progress(service):
    progress = []

    async def scenario():
        async with SandboxClient(service.url, max_concurrency=8) as client:
            requests = [RunCodeRequest(code=f"print({i} ** 2)", language="python") for i in range(20)]
            return await client.run_many(requests, progress=lambda done, total: progress.append((done, total)))

    responses = asyncio.run(scenario())
    assert [r.run_result.stdout for r in responses] == [f"{i ** 2}\n" for i in range(20)]
    assert progress[-1] == (20, 20) and len(progress) == 20


def test_unreachable_service_gives_up_after_the_retry_budget():
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario():
        async with SandboxClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_attempts=3, base_delay_s=0.01)) as client:
            assert await client.ping() is False
            await client.run_code(RunCodeRequest(code="print(1)", language="python"))

    with pytest.raises(SandboxClientError, match="gave up after 3 attempts; last: ConnectError"):
        asyncio.run(scenario())


def test_validation_errors_are_not_retried(service):
    async def scenario():
        async with SandboxClient(service.url) as client:
            await client.run_code(RunCodeRequest(code="", language="python", run_timeout=-1))

    with pytest.raises(SandboxClientError) as error:
        asyncio.run(scenario())
    assert error.value.status == 422 and error.value.detail[0]["loc"] == ["body", "run_timeout"]


@contextlib.asynccontextmanager
async def _sandboxfusion_like_proxy(upstream: str):
    """A server with only SandboxFusion's endpoints: /run_code forwarded upstream, anything else 404."""
    app = fastapi.FastAPI()
    client = SandboxClient(upstream)

    @app.post("/run_code")
    async def run_code(request: RunCodeRequest) -> RunCodeResponse:
        return await client.run_code(request)

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        await client.close()


def test_run_tests_falls_back_to_run_code_on_sandboxfusion(service):
    code = "n = int(input())\nassert n >= 0\nprint(n + 1)\n"
    cases = [TestCase(stdin="1", expected_stdout="2"), TestCase(stdin="5", expected_stdout="7"),
             TestCase(stdin="-1", expected_stdout="0"), TestCase(stdin="0", expected_stdout="1  \n")]
    request = RunTestsRequest(code=code, language="python", test_cases=cases)

    async def scenario():
        async with _sandboxfusion_like_proxy(service.url) as fusion_url:
            async with SandboxClient(fusion_url) as fusion, SandboxClient(service.url) as native:
                return await fusion.run_tests(request), await native.run_tests(request)

    emulated, native = asyncio.run(scenario())
    assert [r.passed for r in emulated.test_results] == [r.passed for r in native.test_results] == [True, False, False, True]
    assert emulated.status == native.status == RunStatus.FAILED
    assert emulated.test_results[2].run_result.return_code == native.test_results[2].run_result.return_code == 1


# -- the retry policy, against scripted transports ---------------------------------------------------

OK_BODY = {"status": "Success", "message": "", "compile_result": None, "run_result": None, "files": {}}


def scripted(script):
    """An httpx transport answering each request with the next step of `script[host]`: an exception
    class to raise, or a status code. Records (host, request id) per attempt."""
    attempts = []

    def handle(request: httpx.Request) -> httpx.Response:
        attempts.append((request.url.host, request.headers["X-Request-Id"]))
        step = script[request.url.host].pop(0)
        if isinstance(step, type):
            raise step("scripted", request=request)
        headers = {"Retry-After": "0"} if step == 503 else {}
        return httpx.Response(step, json=OK_BODY if step == 200 else {"detail": "scripted"}, headers=headers)

    return httpx.MockTransport(handle), attempts


def call(urls, transport, times=1):
    async def scenario():
        async with SandboxClient(urls, transport=transport, retry=RetryPolicy(base_delay_s=0.001)) as client:
            return [await client.run_code(RunCodeRequest(code="print(1)", language="python")) for _ in range(times)]
    return asyncio.run(scenario())[-1]


def test_refused_connection_and_503_are_retried_with_one_request_id():
    transport, attempts = scripted({"a": [httpx.ConnectError, 503, 200]})
    assert call("http://a", transport).status == RunStatus.SUCCESS
    assert len(attempts) == 3 and len({request_id for _, request_id in attempts}) == 1


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout])
def test_failures_after_sending_are_never_retried(error):
    transport, attempts = scripted({"a": [error, 200], "b": [200]})
    with pytest.raises(SandboxClientError) as failure:
        call(["http://a", "http://b"], transport)
    assert failure.value.may_have_run and len(attempts) == 1


@pytest.mark.parametrize("status", [500, 502, 504])
def test_server_errors_that_may_follow_a_run_are_not_retried(status):
    transport, attempts = scripted({"a": [status, 200]})
    with pytest.raises(SandboxClientError) as failure:
        call("http://a", transport)
    assert failure.value.status == status and len(attempts) == 1


def test_a_refusing_endpoint_is_skipped_during_its_cooldown():
    transport, attempts = scripted({"a": [httpx.ConnectError], "b": [200] * 4})
    assert call(["http://a", "http://b"], transport, times=4).status == RunStatus.SUCCESS
    assert [host for host, _ in attempts] == ["a", "b", "b", "b", "b"]


def test_deadline_bounds_the_retries():
    transport, attempts = scripted({"a": [503] * 1000})
    started = time.monotonic()
    with pytest.raises(SandboxClientError, match="gave up"):
        asyncio.run(_with_deadline(transport))
    assert time.monotonic() - started < 2.0 and len(attempts) < 1000


async def _with_deadline(transport):
    policy = RetryPolicy(max_attempts=1000, base_delay_s=0.01, max_delay_s=0.05, deadline_s=0.5)
    async with SandboxClient("http://a", transport=transport, retry=policy) as client:
        await client.run_code(RunCodeRequest(code="", language="python"))


def test_a_refusal_keeps_the_endpoint_down_for_its_retry_after():
    endpoints = EndpointPool(["http://a", "http://b"], base_cooldown_s=0.5)
    draining = endpoints.endpoints[0]
    endpoints.mark_down(draining, 30.0)
    assert 29.0 < draining.down_until - time.monotonic() <= 30.0
    assert {endpoints.pick().url for _ in range(4)} == {"http://b"}


def test_a_round_of_refusals_waits_for_the_first_endpoint_back():
    """a refuses without Retry-After, b asks for 30 s: the call backs off briefly, then tries a again."""
    def handle(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.host)
        if request.url.host == "b":
            return httpx.Response(503, json={"detail": "scripted"}, headers={"Retry-After": "30"})
        if len(attempts) == 1:
            return httpx.Response(503, json={"detail": "scripted"})
        return httpx.Response(200, json=OK_BODY)

    attempts = []
    started = time.monotonic()
    assert call(["http://a", "http://b"], httpx.MockTransport(handle)).status == RunStatus.SUCCESS
    assert attempts == ["a", "b", "a"] and time.monotonic() - started < 5.0


def test_an_endpoint_marked_down_while_a_call_waits_for_a_slot_does_not_get_it():
    async def scenario():
        release = asyncio.Event()

        async def handle(request: httpx.Request) -> httpx.Response:
            attempts.append(request.url.host)
            if len(attempts) == 1:
                await release.wait()
            return httpx.Response(200, json=OK_BODY)

        attempts = []
        async with SandboxClient(["http://a", "http://b"], transport=httpx.MockTransport(handle),
                                 max_concurrency=1) as client:
            request = RunCodeRequest(code="print(1)", language="python")
            first = asyncio.create_task(client.run_code(request))
            while not attempts:
                await asyncio.sleep(0)
            second = asyncio.create_task(client.run_code(request))  # waits for the one slot
            await asyncio.sleep(0.01)
            client.endpoints.mark_down(client.endpoints.endpoints[1], 30.0)  # b starts draining meanwhile
            release.set()
            await asyncio.gather(first, second)
        return attempts

    assert asyncio.run(scenario()) == ["a", "a"]


def test_spreads_load_over_endpoints():
    endpoints = EndpointPool(["http://a", "http://b", "http://c"])
    busy = endpoints.pick()
    busy.in_flight = 5
    picked = {endpoints.pick().url for _ in range(10)}
    assert picked == {"http://a", "http://b", "http://c"} - {busy.url}
