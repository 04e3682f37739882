"""Service configuration: one frozen dataclass, filled from command-line flags.

Limits apply per sandboxed command (a compile or a run). Requests may ask for less time or memory
than the maxima below, never more; `memory_limit_MB = -1` (SandboxFusion's default) means
`default_memory_mb`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _option(default: object, help: str, **kwargs: object) -> object:
    """A config field with its command-line help text."""
    if callable(default):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    host: str = _option("127.0.0.1", "address to listen on")
    port: int = _option(8080, "port to listen on; 0 picks a free one")
    workers: int = _option(lambda: os.cpu_count() or 1, "sandboxes running at once (defaults to the CPU count)")
    max_queue: int = _option(256, "requests waiting for a worker; beyond this: 503 + Retry-After at once")
    max_request_bytes: int = _option(16 << 20, "largest request body; larger ones answer 413")
    max_header_bytes: int = _option(64 << 10, "largest request line + headers; larger ones answer 431 (or 400)")
    max_connections: int = _option(1024, "open connections (and requests in progress); beyond: 503 + Retry-After")
    header_timeout_s: float = _option(10.0, "a connection must send a whole request head within this (s)")
    body_timeout_s: float = _option(30.0, "a request body must arrive within this after its head (s); else 408")
    keepalive_timeout_s: float = _option(75.0, "an idle keep-alive connection is closed after this (s)")
    drain_timeout_s: float = _option(20.0, "on SIGTERM, requests in progress may finish for this long (s)")
    max_test_cases: int = _option(1024, "largest number of test cases in one /run_tests request")
    max_compile_timeout: float = _option(60.0, "largest compile_timeout a request may ask for (s)")
    max_run_timeout: float = _option(60.0, "largest run_timeout a request may ask for (s)")
    default_memory_mb: int = _option(1024, "memory of a run whose memory_limit_MB is -1 (MiB)")
    max_memory_mb: int = _option(8192, "largest memory_limit_MB a request may ask for")
    compile_memory_mb: int = _option(4096, "memory of a compile step (MiB)")
    max_processes: int = _option(256, "RLIMIT_NPROC in the sandbox and cgroup pids.max (threads count)")
    max_open_files: int = _option(1024, "RLIMIT_NOFILE")
    max_file_size_mb: int = _option(256, "RLIMIT_FSIZE: the largest file a program may write (MiB)")
    tmpfs_size_mb: int = _option(256, "size of the sandbox's /tmp and /dev/shm (MiB)")
    max_output_bytes: int = _option(1 << 20, "stdout and stderr are each truncated to this")
    max_fetch_file_bytes: int = _option(16 << 20, "largest file returned through fetch_files")
    max_fetch_total_bytes: int = _option(64 << 20, "largest total of the files returned by one request")
    workspace_size_mb: int = _option(512, "size cap of a run's workspace (a tmpfs when the service is root) (MiB)")
    cpus_per_run: float = _option(0.0, "CPU quota of one sandboxed command through the cpu cgroup (0: none)")
    io_bytes_per_s: int = _option(0, "read and write bandwidth of one command on the work root's disk (0: none)")
    seccomp: str = _option("on", "'on': the syscall filter of sandbox.seccomp applies to every command; 'off'")
    python: str = _option("/usr/bin/python3", "interpreter for user Python: the system's, not a virtualenv")
    uid_base: int = _option(1_000_000_000, "as root, worker slot i runs its sandboxes as host uid uid_base + i")
    cgroups: str = _option("auto", "'auto': cgroup v2 or v1 controllers where writable; 'off': rlimits only")
    work_root: str | None = _option(None, "host directory for run workspaces (default: the system temp dir)")

    def __post_init__(self) -> None:
        positive = ("workers", "max_request_bytes", "max_header_bytes", "max_connections", "header_timeout_s",
                    "body_timeout_s", "keepalive_timeout_s", "max_test_cases", "max_compile_timeout",
                    "max_run_timeout", "default_memory_mb", "max_memory_mb", "compile_memory_mb", "max_processes",
                    "max_open_files", "max_file_size_mb", "tmpfs_size_mb", "max_output_bytes",
                    "max_fetch_file_bytes", "max_fetch_total_bytes", "workspace_size_mb")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("max_queue", "drain_timeout_s", "cpus_per_run", "io_bytes_per_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.seccomp not in ("on", "off"):
            raise ConfigError(f"seccomp: must be 'on' or 'off', got {self.seccomp!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in [0, 65535], got {self.port}")
        if self.default_memory_mb > self.max_memory_mb:
            raise ConfigError(f"default_memory_mb: {self.default_memory_mb} exceeds max_memory_mb {self.max_memory_mb}")
        if self.cgroups not in ("auto", "off"):
            raise ConfigError(f"cgroups: must be 'auto' or 'off', got {self.cgroups!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag-name` per config field, typed from the field's default."""
    defaults = SandboxConfig()
    for field in dataclasses.fields(SandboxConfig):
        default = getattr(defaults, field.name)
        kind = type(default) if default is not None else str
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind,
                            default=default, help=field.metadata["help"])


def from_arguments(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SandboxConfig)})
