"""The execution service: `python -m sandbox.server --port N [--host H] [--workers W] ...`.

A FastAPI application on uvicorn. Endpoints (SandboxFusion-compatible where SandboxFusion has one):
  POST /run_code   one program; request and response as SandboxFusion's RunCodeRequest/RunCodeResponse
  POST /run_tests  codelm's batch endpoint: one program, compiled once, many stdin/stdout test cases
  GET  /v1/ping    "pong" (SandboxFusion's liveness probe)
  GET  /health     JSON: languages with their versions, isolation features, pool occupancy, limits
                   (readiness: 503 once the service is draining)
  GET  /docs       the OpenAPI page (schema at /openapi.json)

Status codes: 200 for every executed request, including programs that fail and service-side
`SandboxError`s (as SandboxFusion does); 422 with FastAPI's `detail: [{loc, msg, type}]` naming the
bad field; 503 + `Retry-After` when the program was not run: the queue is full, too many connections
are open, or the service is draining; 408/413 for a body too slow or too large (see `sandbox.bounds`).

A request whose client disconnects is cancelled, and its sandbox killed. SIGTERM drains: the listener
stays open, and every request not yet running (new, or waiting for a worker) is answered 503 +
`Retry-After` + `Connection: close` with `status: draining` (not run: clients send it elsewhere, and
keep away until the service is gone); /health answers the same, so balancers stop routing here.
Requests running finish, for at most `--drain-timeout-s`. Once none runs and no request has come for
`DRAIN_QUIET_S`, uvicorn shuts down: the listener closes (no client that was answered 503 comes back
before), idle keep-alive connections close (`sandbox.bounds`), and what still runs is cancelled. A
second signal stops at once.
On start it prints `sandbox: listening on http://HOST:PORT` to stdout (with the real port when
`--port 0`), after a self-test sandbox has run, so launchers can wait for that line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, TypeVar

import fastapi
import uvicorn
import uvloop
from fastapi.responses import JSONResponse

from sandbox import config as config_lib
from sandbox.api import (
    RequestValidationError,
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
    RunTestsRequest,
    RunTestsResponse,
)
from sandbox.bounds import DRAIN_IDLE_S, RequestLimits, head_deadline_protocol
from sandbox.cgroups import CgroupSet, discover_cgroups
from sandbox.executor import Executor, LanguageUnavailable, Program, runs_as_slot_uids
from sandbox.hostmounts import private_mount_namespace
from sandbox.isolation import Limits, SandboxHost, SandboxUnavailable, adopt_orphans, run_sandboxed
from sandbox.languages import Registry, Toolchain, discover
from sandbox.scheduler import Overloaded, WorkerPool
from sandbox.workspace import remove_tree

log = logging.getLogger("sandbox")
runs_log = logging.getLogger("sandbox.runs")  # one DEBUG line per executed request, with its X-Request-Id
READY_PREFIX = "sandbox: listening on "
REQUEST_ID_HEADER = "X-Request-Id"
INLINE_PREPARE_BYTES = 64 << 10  # requests whose `files` are smaller are validated on the event loop
# Draining (see `_drain`): the listener closes only once no run request has been refused for this
# long; and at most this long after the drain timeout, however many clients keep knocking.
DRAIN_QUIET_S = 1.0

Response = TypeVar("Response", RunCodeResponse, RunTestsResponse)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work was cancelled."""


class Draining(Exception):
    """The service is stopping and did not run the request: 503, to be sent to another endpoint, and
    to this one no sooner than `retry_after_s` (by then its listener is closed)."""

    def __init__(self, retry_after_s: int):
        super().__init__("not accepted: this endpoint is draining (shutting down); the request was not run, "
                         "send it to another endpoint")
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class Service:
    """What the endpoints need: the configuration, the languages, the executor and the worker pool."""

    config: config_lib.SandboxConfig
    registry: Registry
    executor: Executor
    pool: WorkerPool
    closes_by: float | None = None  # loop time by which the listener is closed; set when the drain begins
    last_refused: float = 0.0  # loop time of the last run request refused while draining
    drain_begun: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def begin_drain(self, closes_by: float) -> None:
        self.closes_by = closes_by
        self.last_refused = asyncio.get_running_loop().time()
        self.drain_begun.set()

    def refuse_if_draining(self, *, record: bool = True) -> None:
        """Raise `Draining` once the drain has begun; `record`: the request counts as a client still
        sending here (a probe does not)."""
        if self.closes_by is None:
            return
        now = asyncio.get_running_loop().time()
        if record:
            self.last_refused = now
        raise Draining(math.ceil(max(0.0, self.closes_by - now)) + 1)

    def health(self) -> dict[str, Any]:
        host = self.executor.host
        uids = None
        if self.executor.slot_uid(0) is not None:
            uids = [self.executor.slot_uid(0), self.executor.slot_uid(self.config.workers - 1)]
        return {
            "status": "ok",
            "languages": self.registry.describe(),
            "pool": dataclasses.asdict(self.pool.stats),
            "isolation": {"bwrap": host.bwrap, "seccomp": host.seccomp_report, "cgroups": host.cgroups.report,
                          "cgroup_version": host.cgroups.version, "slot_uids": uids,
                          "work_root": self.executor.work_root, "workspace": self.executor.workspace_kind},
            "limits": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("host", "port")},
        }

    async def execute(self, run: RunCodeRequest | RunTestsRequest, request_id: str,
                      execute: Callable[[Any, Program, int], Awaitable[Response]],
                      response_type: type[Response]) -> Response:
        self.refuse_if_draining()
        try:
            # Decoding large `files` is CPU work; small requests are validated in place (a thread hop
            # costs more than the work).
            small = sum(len(content or "") for content in run.files.values()) < INLINE_PREPARE_BYTES
            program = self.executor.prepare(run) if small else await asyncio.to_thread(self.executor.prepare, run)
        except LanguageUnavailable as e:
            return response_type(status=RunStatus.SANDBOX_ERROR, message=str(e))
        async with self._slot() as slot:
            runs_log.debug("run %s started in slot %d", request_id, slot)
            try:
                return await execute(run, program, slot)
            except Exception as e:  # a service fault: report it as SandboxFusion does, keep serving
                log.error("execution failed: %s", traceback.format_exc())
                return response_type(status=RunStatus.SANDBOX_ERROR, message=f"sandbox error: {type(e).__name__}: {e}")
            finally:
                runs_log.debug("run %s ended", request_id)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[int]:
        """A worker slot. A request still waiting for one when the drain begins is refused at once: it
        has not run, and running it could outlast the drain timeout."""
        async with contextlib.AsyncExitStack() as stack:
            stats = self.pool.stats
            if stats.queued == 0 and stats.running < stats.workers:  # a slot is free: taken without waiting
                slot = await stack.enter_async_context(self.pool.slot())
            else:
                waiting = asyncio.ensure_future(stack.enter_async_context(self.pool.slot()))
                drain = asyncio.ensure_future(self.drain_begun.wait())
                try:
                    await asyncio.wait({waiting, drain}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pending in (waiting, drain):
                        pending.cancel()
                    await asyncio.gather(waiting, drain, return_exceptions=True)
                self.refuse_if_draining()  # before `waiting.result()`: it was cancelled if the drain came first
                slot = waiting.result()  # Overloaded when the queue was full
            self.refuse_if_draining()
            yield slot


async def _until_disconnected(request: fastapi.Request) -> None:
    """Returns when the client closes its connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


T = TypeVar("T")


async def unless_disconnected(request: fastapi.Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


def create_app(service: Service) -> fastapi.FastAPI:
    """The FastAPI application: routes, error shapes, and the body-size/body-time bound."""
    app = fastapi.FastAPI(title="codelm sandbox", summary="SandboxFusion-compatible code execution",
                          version="2", openapi_url="/openapi.json")

    @app.exception_handler(RequestValidationError)
    async def invalid_field(request: fastapi.Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": error.detail()}, status_code=422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: fastapi.Request, error: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": f"server busy: {error}; retry later"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(Draining)
    async def draining(request: fastapi.Request, error: Draining) -> JSONResponse:
        return JSONResponse({"status": "draining", "detail": str(error)}, status_code=503,
                            headers={"Retry-After": str(error.retry_after_s), "Connection": "close"})

    @app.exception_handler(ClientGone)
    async def client_gone(request: fastapi.Request, error: ClientGone) -> fastapi.Response:
        return fastapi.Response(status_code=499)  # nobody reads it; uvicorn drops it

    @app.get("/v1/ping")
    async def ping() -> str:
        return "pong"

    @app.get("/health")
    async def health() -> dict[str, Any]:
        service.refuse_if_draining(record=False)
        return service.health()

    @app.post("/run_code", response_model=RunCodeResponse)
    async def run_code(body: RunCodeRequest, request: fastapi.Request,
                       response: fastapi.Response) -> RunCodeResponse:
        request_id = _request_id(request, response)
        return await unless_disconnected(
            request, service.execute(body, request_id, service.executor.run_code, RunCodeResponse))

    @app.post("/run_tests", response_model=RunTestsResponse)
    async def run_tests(body: RunTestsRequest, request: fastapi.Request,
                        response: fastapi.Response) -> RunTestsResponse:
        request_id = _request_id(request, response)
        return await unless_disconnected(
            request, service.execute(body, request_id, service.executor.run_tests, RunTestsResponse))

    app.add_middleware(RequestLimits, max_header_bytes=service.config.max_header_bytes,
                       max_bytes=service.config.max_request_bytes, timeout_s=service.config.body_timeout_s)
    return app


def _request_id(request: fastapi.Request, response: fastapi.Response) -> str:
    request_id = request.headers.get(REQUEST_ID_HEADER, "-")[:128]
    response.headers[REQUEST_ID_HEADER] = request_id
    return request_id


class _Server(uvicorn.Server):
    """uvicorn's server, with signals left to `serve` (which must clean up after it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _uvicorn_config(app: fastapi.FastAPI, config: config_lib.SandboxConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app, http=head_deadline_protocol(config.header_timeout_s), lifespan="off", access_log=False,
        log_config=None, server_header=False, limit_concurrency=config.max_connections,
        backlog=config.max_connections, timeout_keep_alive=int(config.keepalive_timeout_s),
        timeout_graceful_shutdown=int(config.drain_timeout_s),  # `_drain` sets it when shutting down
        h11_max_incomplete_event_size=config.max_header_bytes)


async def _self_test(host: SandboxHost, state_dir: str, uid: int | None) -> None:
    """Run /usr/bin/true in a sandbox as a worker would, so a host that cannot create namespaces
    fails at start-up."""
    workspace = tempfile.mkdtemp(dir=state_dir)
    try:
        if uid is not None:
            os.chown(workspace, uid, uid)
        limits = Limits(timeout_s=10, memory_bytes=256 << 20, limit_address_space=True, processes=16,
                        open_files=64, file_size_bytes=1 << 20, tmpfs_bytes=1 << 20, output_bytes=1 << 16)
        outcome = await run_sandboxed(host, ["/usr/bin/true"], toolchain=Toolchain(tools={}), workspace=workspace,
                                      limits=limits, stdin_path=None, run_id="self-test", uid=uid)
    finally:
        remove_tree(workspace)
    if not outcome.result.succeeded:
        raise SandboxUnavailable(f"self-test sandbox failed ({outcome.result.status.value}, "
                                 f"exit {outcome.result.return_code}): {outcome.result.stderr}")


async def serve(config: config_lib.SandboxConfig, ready: Callable[[str, int], None] | None = None) -> None:
    """Run the service until SIGINT/SIGTERM (or cancellation); `ready(host, port)` once listening."""
    service_id = f"codelm-sandbox-{os.getpid()}"
    state_dir = os.path.join(config.work_root or tempfile.gettempdir(), service_id)
    os.makedirs(state_dir, mode=0o711)
    os.chmod(state_dir, 0o711)
    adopt_orphans()
    if runs_as_slot_uids():
        private_mount_namespace()  # before any thread starts; per-run tmpfs and exposures live in it
    cgroups = CgroupSet.disabled("disabled by --cgroups=off") if config.cgroups == "off" else \
        discover_cgroups(service_id)
    host = None
    try:
        registry = discover(config)
        toolchains = [runtime.toolchain for runtime in registry.runtimes.values()]
        host = SandboxHost(state_dir, cgroups, toolchains, runs_as_slot_uids(), seccomp=config.seccomp == "on")
        executor = Executor(config, registry, host, state_dir)
        await _self_test(host, state_dir, executor.slot_uid(0))
        service = Service(config, registry, executor, WorkerPool(config.workers, config.max_queue))
        log.info("languages: %s", json.dumps(registry.describe()))
        log.info("isolation: bwrap=%s seccomp=%s cgroups v%s %s workspace=%s workers=%d queue=%d", host.bwrap,
                 host.seccomp_report, cgroups.version, cgroups.report, executor.workspace_kind, config.workers,
                 config.max_queue)
        await _run_server(service, ready)
    finally:
        cgroups.remove()
        if host is not None:
            host.close()
        remove_tree(state_dir, refuse_mounts=True)


async def _drain(server: uvicorn.Server, service: Service, deadline: float) -> None:
    """Begun by SIGTERM: refuse what is not running yet (503, see `Service.refuse_if_draining`) while
    the runs in progress finish, for up to `deadline` (loop time); then shut uvicorn down.

    The listener stays open until no run request has been refused for `DRAIN_QUIET_S`: closing it
    resets the connections the kernel has queued on it, after their request may have gone out, and the
    client of such a request cannot tell that it did not run. Every client answered 503 was told (in
    Retry-After) to stay away until after the listener is closed."""
    loop = asyncio.get_running_loop()
    service.begin_drain(closes_by=deadline + DRAIN_QUIET_S)
    log.info("draining: %d running; new requests are refused", service.pool.stats.running)
    while True:
        now = loop.time()
        running = service.pool.stats.running > 0 and now < deadline
        if (not running and now - service.last_refused >= DRAIN_QUIET_S) or now >= deadline + DRAIN_QUIET_S:
            break
        await asyncio.sleep(0.05)
    # uvicorn closes an idle keep-alive connection only once it is idle for DRAIN_IDLE_S (`sandbox.bounds`);
    # runs still going past the drain timeout are cancelled at once.
    server.config.timeout_graceful_shutdown = 0 if service.pool.stats.running else DRAIN_IDLE_S + 0.5
    log.info("drained: shutting down%s", f" and cancelling {service.pool.stats.running} runs past the drain timeout"
             if service.pool.stats.running else "")
    server.should_exit = True


async def _run_server(service: Service, ready: Callable[[str, int], None] | None) -> None:
    """Serve until a signal; then drain, cancel what is left and wait until every request is gone."""
    config = service.config
    listener = socket.create_server((config.host, config.port), backlog=config.max_connections,
                                    family=socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    server = _Server(_uvicorn_config(create_app(service), config))
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task] = []

    def stop() -> None:
        if draining:  # a second signal skips the drain
            server.force_exit = server.should_exit = True
            return
        draining.append(asyncio.create_task(_drain(server, service, loop.time() + config.drain_timeout_s)))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started and ready is not None:
            ready(config.host, listener.getsockname()[1])
        await asyncio.shield(serving)
    finally:
        server.should_exit = True
        for task in draining:
            task.cancel()
        await asyncio.gather(serving, *draining, return_exceptions=True)
        # Requests cancelled after the drain: their sandboxes are killed and their workspaces removed
        # before the state directory goes.
        await asyncio.gather(*server.server_state.tasks, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        listener.close()


def main(argv: list[str] | None = None) -> None:
    """Runs the service on uvloop (pinned in requirements.txt): its event loop serves the HTTP protocol
    callbacks for less CPU per request than asyncio's selector loop."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.server", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_lib.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_lib.from_arguments(args)
    except config_lib.ConfigError as e:
        parser.error(str(e))

    def announce(host: str, port: int) -> None:
        print(f"{READY_PREFIX}http://{host}:{port}", flush=True)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, announce))
    except SandboxUnavailable as e:
        sys.exit(f"sandbox: cannot start: {e}")


if __name__ == "__main__":
    main()
