"""Wire types of the execution service: SandboxFusion's `/run_code` schema plus codelm's `/run_tests`.

Pydantic models with SandboxFusion's field names, defaults and status strings (bytedance/SandboxFusion,
`sandbox/server/sandbox_api.py` and `sandbox/runners/types.py`), so either side can talk to the other.
Unknown request fields are ignored, as there; a bad field answers 422 in FastAPI's shape,
`{"detail": [{"type", "loc": ["body", field, ...], "msg", ...}]}`. Numbers and booleans are strict:
`"10"` is not a timeout and `true` is not a memory size.

Status vocabulary:
  RunStatus (whole request):      Success | Failed | SandboxError
  CommandRunStatus (one command): Finished | TimeLimitExceeded | Error
A command that ran to completion is `Finished` whatever its exit code; the request is `Failed` when
any command timed out or exited non-zero, and `SandboxError` when the service itself failed.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import pydantic

StrictNumber = Annotated[float, pydantic.Field(strict=True)]
StrictInt = Annotated[int, pydantic.Field(strict=True)]


class RunStatus(str, enum.Enum):
    SUCCESS = "Success"
    FAILED = "Failed"
    SANDBOX_ERROR = "SandboxError"


class CommandRunStatus(str, enum.Enum):
    FINISHED = "Finished"
    TIME_LIMIT_EXCEEDED = "TimeLimitExceeded"
    ERROR = "Error"


class OutputMatch(str, enum.Enum):
    """How `/run_tests` compares stdout with `expected_stdout`.

    LINES: line by line, trailing whitespace of each line and trailing blank lines ignored
    (the usual lenient judge rule). EXACT: byte-for-byte after UTF-8 decoding.
    """

    LINES = "lines"
    EXACT = "exact"


class RequestValidationError(ValueError):
    """A request field is invalid against this server's limits or languages (checked after the schema).
    `loc` is its path below the body, e.g. ("test_cases", 3, "stdin") or "run_timeout"; the server
    answers 422 naming it."""

    def __init__(self, loc: str | tuple[str | int, ...], message: str):
        self.loc = (loc,) if isinstance(loc, str) else tuple(loc)
        self.field = ".".join(str(part) for part in self.loc)
        super().__init__(f"{self.field}: {message}")
        self.message = message

    def detail(self) -> list[dict[str, Any]]:
        """FastAPI's 422 `detail` list for this error."""
        return [{"type": "value_error", "loc": ["body", *self.loc], "msg": self.message}]


class _Request(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    code: str
    language: str
    compile_timeout: StrictNumber = 10.0
    run_timeout: StrictNumber = 10.0
    memory_limit_MB: StrictInt = -1
    files: dict[str, str | None] = pydantic.Field(default_factory=dict)
    fetch_files: list[str] = pydantic.Field(default_factory=list)


class RunCodeRequest(_Request):
    """One program: compiled (for compiled languages) then run once.

    files: workspace-relative path -> base64 content written next to the program before it runs
      (null entries are skipped, as SandboxFusion does).
    fetch_files: workspace-relative paths whose content is returned base64-encoded after the run.
    memory_limit_MB: -1 means the server's default limit.
    """

    stdin: str | None = None


class TestCase(pydantic.BaseModel):
    """One run of a compiled program: `stdin` in; if `expected_stdout` is set, stdout must match it."""

    __test__ = False  # not a pytest class, despite the name
    model_config = pydantic.ConfigDict(extra="ignore")

    stdin: str | None = None
    expected_stdout: str | None = None


class RunTestsRequest(_Request):
    """codelm's batch endpoint: one program, compiled once, run once per test case, in order.

    A test passes when the run finishes with exit code 0 and (if `expected_stdout` is given) its
    stdout matches under `output_match`. With `stop_on_first_failure`, the remaining cases are not run.
    """

    __test__ = False

    test_cases: Annotated[list[TestCase], pydantic.Field(min_length=1)]
    output_match: OutputMatch = OutputMatch.LINES
    stop_on_first_failure: Annotated[bool, pydantic.Field(strict=True)] = False

    def single_run(self, case: TestCase) -> RunCodeRequest:
        """The `/run_code` request that runs this program on one test case."""
        return RunCodeRequest(code=self.code, language=self.language, stdin=case.stdin,
                              compile_timeout=self.compile_timeout, run_timeout=self.run_timeout,
                              memory_limit_MB=self.memory_limit_MB, files=self.files)


class CommandRunResult(pydantic.BaseModel):
    """One command (compile or run). `return_code` is None when the command was killed for time;
    a command killed by signal N reports 128 + N, as a shell would."""

    status: CommandRunStatus
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == CommandRunStatus.FINISHED and self.return_code == 0


def overall_status(*results: CommandRunResult | None) -> RunStatus:
    """SandboxFusion's rule: any Error -> SandboxError; any timeout or non-zero exit -> Failed."""
    ran = [r for r in results if r is not None]
    if any(r.status == CommandRunStatus.ERROR for r in ran):
        return RunStatus.SANDBOX_ERROR
    if not ran or not all(r.succeeded for r in ran):
        return RunStatus.FAILED
    return RunStatus.SUCCESS


class RunCodeResponse(pydantic.BaseModel):
    status: RunStatus
    message: str = ""
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = pydantic.Field(default_factory=dict)


class TestCaseResult(pydantic.BaseModel):
    """The outcome of one test case; `run_result` is None for a case that was never run."""

    __test__ = False

    passed: bool
    run_result: CommandRunResult | None = None


class RunTestsResponse(pydantic.BaseModel):
    """`test_results` has one entry per requested test case, in request order."""

    status: RunStatus
    message: str = ""
    compile_result: CommandRunResult | None = None
    test_results: list[TestCaseResult] = pydantic.Field(default_factory=list)
    files: dict[str, str] = pydantic.Field(default_factory=dict)

    @pydantic.computed_field
    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.test_results)

    @pydantic.computed_field
    @property
    def total(self) -> int:
        return len(self.test_results)

    @property
    def num_passed(self) -> int:
        return self.passed


def stdout_matches(actual: str, expected: str, mode: OutputMatch) -> bool:
    if mode == OutputMatch.EXACT:
        return actual == expected

    def normalized(text: str) -> list[str]:
        lines = [line.rstrip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return normalized(actual) == normalized(expected)
