"""Two endpoints, one of which goes away mid-load: the multi-endpoint client carries on with the
other, loses nothing it could safely retry, and runs no program twice (checked against the services'
per-request run logs, keyed by the X-Request-Id every attempt of a call carries)."""

import asyncio
import re
import signal

from sandbox.api import RunCodeRequest, RunStatus
from sandbox.cgroups import CgroupSet
from sandbox.client import SandboxClient, SandboxClientError
from sandbox.local import LocalSandbox
from sandbox.workspace import remove_tree

REQUESTS = 40
STARTED = re.compile(r"run (\S+) started")


def runs_started(service: LocalSandbox) -> list[str]:
    with open(service.log_path) as f:
        return STARTED.findall(f.read())


def program(i: int) -> RunCodeRequest:
    return RunCodeRequest(code=f"import time\ntime.sleep(0.3)\nprint({i})", language="python")


async def load_while(client: SandboxClient, stop_after_s: float, stop) -> dict[str, object]:
    """REQUESTS calls, `stop()` after `stop_after_s`; request id -> response or SandboxClientError."""
    async def one(i: int):
        try:
            return await client.run_code(program(i), request_id=f"req-{i}")
        except SandboxClientError as e:
            return e

    calls = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
    await asyncio.sleep(stop_after_s)
    stop()
    return {f"req-{i}": result for i, result in enumerate(await asyncio.gather(*calls))}


def two_services(**flags):
    return [LocalSandbox(workers=2, max_queue=64, log_level="DEBUG", **flags).start() for _ in range(2)]


def remove_leftovers_of_killed(health: dict) -> None:
    """A SIGKILLed service cannot clean up: its sandboxes died with it (--die-with-parent), but its
    cgroups and state directory stay. Remove them as an operator (or a pod restart) would."""
    version = health["isolation"]["cgroup_version"]
    parents = {key: path for key, path in health["isolation"]["cgroups"].items() if path.startswith("/")}
    CgroupSet(version, {key: path for key, path in parents.items()}, {}).remove()
    remove_tree(health["isolation"]["work_root"])


def test_endpoint_drained_by_sigterm_runs_everything_once():
    first, second = two_services(drain_timeout_s=30)
    try:
        async def scenario():
            async with SandboxClient([first.url, second.url], max_concurrency=16) as client:
                return await load_while(client, 1.0, lambda: second.proc.send_signal(signal.SIGTERM))

        results = asyncio.run(scenario())
        assert second.proc.wait(30) == 0
        started = runs_started(first) + runs_started(second)
    finally:
        first.stop()
        second.stop()
    succeeded = {rid: r for rid, r in results.items() if not isinstance(r, Exception)}
    assert all(r.status == RunStatus.SUCCESS and r.run_result.stdout == f"{rid[4:]}\n" for rid, r in succeeded.items())
    assert sorted(started) == sorted(succeeded)  # every answered request ran exactly once
    # Known race (see sandbox/README.md): a connection the kernel queued just as the listener closed is
    # reset after the request went out. Such a request did not run anywhere, but the client cannot know:
    # it reports it as possibly run instead of risking a second run.
    unanswered = {rid: r for rid, r in results.items() if isinstance(r, Exception)}
    assert all(e.may_have_run for e in unanswered.values()) and len(unanswered) <= 2, unanswered
    assert not set(unanswered) & set(started)


def test_endpoint_killed_mid_load_runs_nothing_twice():
    first, second = two_services()
    killed_health = None
    try:
        async def scenario():
            async with SandboxClient(second.url) as probe:
                health = await probe.health()
            async with SandboxClient([first.url, second.url], max_concurrency=16) as client:
                return await load_while(client, 1.0, second.proc.kill), health

        results, killed_health = asyncio.run(scenario())
        second.proc.wait(10)
        started_first, started_second = runs_started(first), runs_started(second)
    finally:
        first.stop()
        second.stop()
        if killed_health is not None:
            remove_leftovers_of_killed(killed_health)
    succeeded = {rid for rid, r in results.items() if not isinstance(r, Exception)}
    failed = {rid: r for rid, r in results.items() if isinstance(r, Exception)}
    started = started_first + started_second
    assert len(started) == len(set(started))  # no program ran twice
    assert succeeded <= set(started) and all(results[rid].status == RunStatus.SUCCESS for rid in succeeded)
    # What failed was in flight on the killed endpoint: flagged as possibly run, never retried elsewhere.
    assert all(e.may_have_run for e in failed.values()), failed
    assert not set(failed) & set(started_first)
    assert 0 < len(started_second) and len(failed) <= 16  # at most what was in flight
    assert len(succeeded) >= REQUESTS - 16
