"""A private execution service for the sandbox tests: two workers, on an ephemeral loopback port.

The service runs as a child process with a canary secret in its environment, so tests can prove the
secret never reaches a sandboxed program.
"""

import asyncio
import os
import time

import pytest

from sandbox.api import RunCodeRequest, RunStatus
from sandbox.client import SandboxClient
from sandbox.local import LocalSandbox
from tests.sandbox.helpers import CANARY_ENV, CANARY_VALUE, leftovers, python


@pytest.fixture(scope="session")
def service():
    env = dict(os.environ, **{CANARY_ENV: CANARY_VALUE})
    with LocalSandbox(env=env, workers=2, max_queue=64, max_output_bytes=65536,
                      max_processes=64, max_file_size_mb=16, tmpfs_size_mb=128, workspace_size_mb=64,
                      max_fetch_file_bytes=768 << 10, max_fetch_total_bytes=1 << 20, max_test_cases=100) as running:
        yield running


@pytest.fixture(scope="session")
def run(service):
    """Call the service from a synchronous test: `run(lambda client: client.run_code(...))`."""

    def call(action):
        async def session():
            async with SandboxClient(service.url) as client:
                return await action(client)

        return asyncio.run(session())

    return call


@pytest.fixture
def contained(service, run):
    """Run one hostile request, then check the aftermath (no process, cgroup or workspace left, a
    normal request served); returns the response and its wall time."""

    def execute(request: RunCodeRequest):
        started = time.monotonic()
        response = run(lambda client: client.run_code(request))
        elapsed = time.monotonic() - started
        health = run(lambda client: client.health())
        assert leftovers(service.proc.pid, health) == {"processes": [], "cgroups": [], "workspaces": []}
        normal = run(lambda client: client.run_code(python("print(6 * 7)")))
        assert normal.status == RunStatus.SUCCESS and normal.run_result.stdout == "42\n"
        assert service.proc.poll() is None
        return response, elapsed

    return execute
