"""HTTP bounds: slow clients, oversized messages and idle connections are cut off without stopping
normal requests from being served, and a client that disconnects has its program killed."""

import asyncio
import json
import socket
import time

import pytest

from sandbox.api import RunCodeRequest, RunStatus
from sandbox.client import SandboxClient
from sandbox.local import LocalSandbox
from tests.sandbox.helpers import python, sandbox_processes

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_BODY = 64 << 10
MAX_CONNECTIONS = 48


@pytest.fixture(scope="module")
def bounded():
    with LocalSandbox(workers=2, max_queue=16, header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S,
                      max_request_bytes=MAX_BODY, max_connections=MAX_CONNECTIONS, max_header_bytes=8192) as running:
        yield running


def connect(service) -> socket.socket:
    host, port = service.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def exchange(service, raw: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer (the server closes after it): status and body."""
    with connect(service) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def served(service, n=3) -> list[float]:
    """Latencies of n normal requests, each checked."""
    async def session():
        async with SandboxClient(service.url) as client:
            latencies = []
            for i in range(n):
                started = time.monotonic()
                response = await client.run_code(python(f"print({i} * 3)"))
                assert response.status == RunStatus.SUCCESS and response.run_result.stdout == f"{i * 3}\n"
                latencies.append(time.monotonic() - started)
            return latencies
    return asyncio.run(session())


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_request_heads_are_cut_off_and_others_served(bounded):
    slow = [connect(bounded) for _ in range(16)]
    for sock in slow:
        sock.sendall(b"POST /run_code HTTP/1.1\r\nHost: x\r\n")
    deadline = time.monotonic() + HEADER_TIMEOUT_S / 2
    while time.monotonic() < deadline:  # one header byte at a time keeps nothing alive
        for sock in slow:
            sock.sendall(b"X")
        time.sleep(0.1)
    assert max(served(bounded)) < 2.0
    assert all(closed_by_server(sock, within_s=HEADER_TIMEOUT_S + 2) for sock in slow)
    for sock in slow:
        sock.close()


def test_many_idle_connections_do_not_stop_service(bounded):
    idle = [connect(bounded) for _ in range(MAX_CONNECTIONS + 16)]  # more than the service takes at once
    try:
        # New requests meet 503s until the head deadline closes the idle connections; the client
        # retries those (the program never ran) and gets through.
        assert max(served(bounded)) < HEADER_TIMEOUT_S + 5
        assert all(closed_by_server(sock, within_s=HEADER_TIMEOUT_S + 2) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    assert max(served(bounded)) < 2.0


def test_oversized_bodies_are_refused(bounded):
    head = b"POST /run_code HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, body = exchange(bounded, head + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
    assert status == 413 and "exceeds the limit" in json.loads(body)["detail"]  # refused before the body is sent
    chunk = b"x" * 8192
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 1)) + b"0\r\n\r\n"
    status, _ = exchange(bounded, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status == 413
    status, _ = exchange(bounded, b"GET /v1/ping HTTP/1.1\r\nConnection: close\r\nX-Big: " + b"h" * 16384 + b"\r\n\r\n")
    assert status in (400, 431)  # head larger than max_header_bytes: h11 (arriving in pieces) or the app (whole)
    assert max(served(bounded)) < 2.0


def test_slow_body_is_refused(bounded):
    with connect(bounded) as sock:
        sock.sendall(b"POST /run_code HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and BODY_TIMEOUT_S <= time.monotonic() - started < BODY_TIMEOUT_S + 2


def test_disconnecting_client_cancels_its_run(bounded):
    async def start_and_leave():
        async with SandboxClient(bounded.url) as client:
            slot_uids = (await client.health())["isolation"]["slot_uids"]
            call = asyncio.create_task(client.run_code(RunCodeRequest(
                code="import time\ntime.sleep(60)", language="python", run_timeout=60)))
            deadline = time.monotonic() + 10
            while not sandbox_processes(bounded.proc.pid, slot_uids) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sandbox_processes(bounded.proc.pid, slot_uids), "the program never started"
            call.cancel()  # closes the connection
            return slot_uids

    slot_uids = asyncio.run(start_and_leave())
    deadline = time.monotonic() + 5
    while sandbox_processes(bounded.proc.pid, slot_uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(bounded.proc.pid, slot_uids) == []

    async def pool():
        async with SandboxClient(bounded.url) as client:
            return (await client.health())["pool"]
    assert asyncio.run(pool())["running"] == 0
