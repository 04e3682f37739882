"""Turn `/run_code` and `/run_tests` requests into sandboxed compile and run commands.

`Executor.prepare` validates a request against the server's limits and languages (raising
`RequestValidationError` naming the field) before it waits for a worker; `Executor.run_*` then runs
it in a worker slot: a fresh workspace (`sandbox.workspace`), owned by the slot's uid, holds the
program and its files, is bound into each sandbox at /workspace, and is deleted when the request is
done. Workspace setup, removal and file fetching run in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import itertools
import os
from collections.abc import AsyncIterator, Callable

from sandbox.api import (
    CommandRunResult,
    CommandRunStatus,
    RequestValidationError,
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
    RunTestsRequest,
    RunTestsResponse,
    TestCaseResult,
    overall_status,
    stdout_matches,
)
from sandbox.config import SandboxConfig
from sandbox.isolation import Limits, Outcome, SandboxHost, run_sandboxed
from sandbox.languages import LANGUAGES, Registry, Runtime, Step
from sandbox.workspace import Workspace, WorkspaceSetupError

MIN_MEMORY_MB = 32  # below this even an interpreter cannot start
INLINE_WRITE_BYTES = 64 << 10  # smaller stdin files are written on the event loop


def runs_as_slot_uids() -> bool:
    """Sandboxes get host uids of their own only when the service can switch to them (runs as root)."""
    return os.geteuid() == 0


class LanguageUnavailable(Exception):
    """A SandboxFusion language whose toolchain this host lacks: a service-side error."""


@dataclasses.dataclass
class Program:
    """A validated program: what to write into the workspace and under which limits to run it."""

    runtime: Runtime
    code: str
    files: dict[str, bytes]
    fetch_files: list[str]
    compile_timeout: float
    run_timeout: float
    memory_mb: int


def _workspace_path(path: str, field: tuple[str | int, ...]) -> str:
    normalized = os.path.normpath(path)
    if not path or os.path.isabs(path) or normalized == "." or normalized.split(os.sep)[0] == ".." or "\0" in path:
        raise RequestValidationError(field, f"{path!r} must be a relative path inside the workspace")
    return normalized


class Executor:
    def __init__(self, config: SandboxConfig, registry: Registry, host: SandboxHost, work_root: str):
        self.config = config
        self.registry = registry
        self.host = host
        self.work_root = work_root
        self._run_ids = itertools.count()
        self.on_tmpfs = runs_as_slot_uids()  # mounting a tmpfs needs root (in the private mount namespace)

    @property
    def workspace_kind(self) -> str:
        if self.on_tmpfs:
            return f"tmpfs of {self.config.workspace_size_mb} MiB per run"
        return "directory on the work root (not root: no tmpfs, no size cap beyond RLIMIT_FSIZE per file)"

    # -- validation ---------------------------------------------------------------------------------

    def prepare(self, request: RunCodeRequest | RunTestsRequest) -> Program:
        runtime = self._runtime(request.language)
        source = runtime.source_name(request.code)
        files: dict[str, bytes] = {}
        for path, content in request.files.items():
            if content is None:
                continue
            target = _workspace_path(path, ("files", path))
            if target == source:
                raise RequestValidationError(("files", path), f"would overwrite the program source {source}")
            try:
                files[target] = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise RequestValidationError(("files", path), "is not valid base64") from None
        if sum(len(content) for content in files.values()) > self.config.workspace_size_mb << 20:
            raise RequestValidationError("files", f"exceed the workspace size of {self.config.workspace_size_mb} MiB")
        if isinstance(request, RunTestsRequest) and len(request.test_cases) > self.config.max_test_cases:
            raise RequestValidationError("test_cases", f"{len(request.test_cases)} test cases exceed the limit of "
                                                       f"{self.config.max_test_cases}")
        fetch = [_workspace_path(p, ("fetch_files", i)) for i, p in enumerate(request.fetch_files)]
        return Program(
            runtime=runtime, code=request.code, files=files, fetch_files=fetch,
            compile_timeout=self._timeout(request.compile_timeout, "compile_timeout", self.config.max_compile_timeout),
            run_timeout=self._timeout(request.run_timeout, "run_timeout", self.config.max_run_timeout),
            memory_mb=self._memory(request.memory_limit_MB),
        )

    def _runtime(self, language: str) -> Runtime:
        if language in self.registry.runtimes:
            return self.registry.runtimes[language]
        if language in self.registry.missing:
            raise LanguageUnavailable(f"language {language!r} is not available on this server: "
                                      f"{self.registry.missing[language]}")
        known = ", ".join(lang.name for lang in LANGUAGES)
        raise RequestValidationError("language", f"unsupported language {language!r}; this server knows {known}")

    @staticmethod
    def _timeout(value: float, field: str, maximum: float) -> float:
        if not 0 < value <= maximum:
            raise RequestValidationError(field, f"must be in (0, {maximum:g}] seconds, got {value:g}")
        return value

    def _memory(self, value: int) -> int:
        if value == -1:
            return self.config.default_memory_mb
        if not MIN_MEMORY_MB <= value <= self.config.max_memory_mb:
            raise RequestValidationError(
                "memory_limit_MB", f"must be -1 (server default) or in [{MIN_MEMORY_MB}, {self.config.max_memory_mb}], got {value}")
        return value

    # -- execution ----------------------------------------------------------------------------------

    async def run_code(self, request: RunCodeRequest, program: Program, slot: int) -> RunCodeResponse:
        try:
            async with self._workspace(program, slot) as workspace:
                compiled, notes = await self._compile(program, workspace, slot)
                if compiled is not None and not compiled.succeeded:
                    return RunCodeResponse(status=overall_status(compiled), message="; ".join(notes),
                                           compile_result=compiled)
                stdin = await _stdin_file(workspace, request.stdin)
                ran = await self._run(program, program.runtime.language.run, program.run_timeout, workspace, slot,
                                      stdin)
                files, fetch_notes = await _fetch(workspace, program.fetch_files)
                return RunCodeResponse(status=overall_status(compiled, ran.result),
                                       message="; ".join(notes + ran.notes + fetch_notes), compile_result=compiled,
                                       run_result=ran.result, files=files)
        except WorkspaceSetupError as e:
            return RunCodeResponse(status=RunStatus.SANDBOX_ERROR, message=str(e))

    async def run_tests(self, request: RunTestsRequest, program: Program, slot: int) -> RunTestsResponse:
        try:
            async with self._workspace(program, slot) as workspace:
                return await self._run_tests(request, program, slot, workspace)
        except WorkspaceSetupError as e:
            return RunTestsResponse(status=RunStatus.SANDBOX_ERROR, message=str(e),
                                    test_results=[TestCaseResult(passed=False) for _ in request.test_cases])

    async def _run_tests(self, request: RunTestsRequest, program: Program, slot: int,
                         workspace: Workspace) -> RunTestsResponse:
        compiled, notes = await self._compile(program, workspace, slot)
        if compiled is not None and not compiled.succeeded:
            not_run = [TestCaseResult(passed=False) for _ in request.test_cases]
            return RunTestsResponse(status=overall_status(compiled), message="; ".join(notes),
                                    compile_result=compiled, test_results=not_run)
        results: list[TestCaseResult] = []
        for index, case in enumerate(request.test_cases):
            if results and request.stop_on_first_failure and not results[-1].passed:
                results.append(TestCaseResult(passed=False))
                continue
            stdin = await _stdin_file(workspace, case.stdin)
            ran = await self._run(program, program.runtime.language.run, program.run_timeout, workspace, slot, stdin)
            passed = ran.result.succeeded and (
                case.expected_stdout is None
                or stdout_matches(ran.result.stdout or "", case.expected_stdout, request.output_match))
            results.append(TestCaseResult(passed=passed, run_result=ran.result))
            notes += [f"test {index}: {note}" for note in ran.notes]
        if any(r.run_result is not None and r.run_result.status == CommandRunStatus.ERROR for r in results):
            status = RunStatus.SANDBOX_ERROR
        else:
            status = RunStatus.SUCCESS if all(r.passed for r in results) else RunStatus.FAILED
        files, fetch_notes = await _fetch(workspace, program.fetch_files)
        return RunTestsResponse(status=status, message="; ".join(notes + fetch_notes), compile_result=compiled,
                                test_results=results, files=files)

    async def _compile(self, program: Program, workspace: Workspace, slot: int) -> tuple[CommandRunResult | None, list[str]]:
        step = program.runtime.language.compile
        if step is None:
            return None, []
        outcome = await self._run(program, step, program.compile_timeout, workspace, slot, None,
                                  memory_mb=max(self.config.compile_memory_mb, program.memory_mb))
        return outcome.result, [f"compile: {note}" for note in outcome.notes]

    async def _run(self, program: Program, step: Step, timeout: float, workspace: Workspace, slot: int,
                   stdin_path: str | None, memory_mb: int | None = None) -> Outcome:
        memory_mb = memory_mb or program.memory_mb
        # RLIMIT_AS counts reserved, not used, memory (a 16-thread pool reserves 64 MiB malloc arenas
        # each): only where no memory cgroup bounds what is really used.
        limits = Limits(
            timeout_s=timeout, memory_bytes=memory_mb << 20,
            limit_address_space=step.limit_address_space and not self.host.cgroups.has_memory,
            processes=self.config.max_processes, open_files=self.config.max_open_files,
            file_size_bytes=self.config.max_file_size_mb << 20, tmpfs_bytes=self.config.tmpfs_size_mb << 20,
            output_bytes=self.config.max_output_bytes, cpus=self.config.cpus_per_run,
            io_bytes_per_s=self.config.io_bytes_per_s,
        )
        return await run_sandboxed(
            self.host, program.runtime.argv(step, program.code, memory_mb), toolchain=program.runtime.toolchain,
            workspace=workspace.path, limits=limits, stdin_path=stdin_path,
            run_id=f"slot{slot}-{next(self._run_ids)}", uid=self.slot_uid(slot))

    def slot_uid(self, slot: int) -> int | None:
        """The host uid a worker slot's sandboxes run as: distinct per slot when the service is root."""
        return self.config.uid_base + slot if runs_as_slot_uids() else None

    @contextlib.asynccontextmanager
    async def _workspace(self, program: Program, slot: int) -> AsyncIterator[Workspace]:
        """The run's workspace, created and removed in threads; removal completes even if cancelled."""
        files = {program.runtime.source_name(program.code): program.code.encode("utf-8"), **program.files}
        workspace = await asyncio.to_thread(
            Workspace.create, self.work_root, files, uid=self.slot_uid(slot),
            size_bytes=self.config.workspace_size_mb << 20, on_tmpfs=self.on_tmpfs,
            max_fetch_bytes=self.config.max_fetch_file_bytes, max_fetch_total_bytes=self.config.max_fetch_total_bytes)
        try:
            yield workspace
        finally:
            await _to_thread_to_completion(workspace.remove)


async def _stdin_file(workspace: Workspace, stdin: str | None) -> str | None:
    """The stdin file: a small one is written on the event loop (a thread hop costs more)."""
    if stdin is None or len(stdin) < INLINE_WRITE_BYTES:
        return workspace.stdin_file(stdin)
    return await asyncio.to_thread(workspace.stdin_file, stdin)


async def _fetch(workspace: Workspace, paths: list[str]) -> tuple[dict[str, str], list[str]]:
    return await asyncio.to_thread(workspace.fetch, paths) if paths else ({}, [])


async def _to_thread_to_completion(function: Callable[[], None]) -> None:
    """Run `function` in a thread and wait for it even when cancelled meanwhile (then re-raise)."""
    done = asyncio.ensure_future(asyncio.to_thread(function))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await done
        raise
