"""Start a private execution service as a child process, for evaluation runs and tests.

    with LocalSandbox(workers=4) as service:
        async with SandboxClient(service.url) as client: ...

The service listens on an ephemeral loopback port and is stopped (SIGTERM, then SIGKILL) on exit;
its log goes to a temporary file, quoted if it fails to start and deleted when it stops.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time

from sandbox.server import READY_PREFIX

_STOP_GRACE_S = 10.0  # beyond the drain: then SIGKILL


class LocalSandbox:
    """flags: extra `sandbox.server` command-line flags as name -> value (`max_queue=4` -> `--max-queue 4`).
    Stopping does not wait for requests in progress unless `drain_timeout_s` is given."""

    def __init__(self, *, startup_timeout_s: float = 60.0, env: dict[str, str] | None = None, **flags: object):
        self.flags = {"drain_timeout_s": 0, **flags}
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="codelm-sandbox-", suffix=".log", delete=False)

    @property
    def log_path(self) -> str:
        return self._log.name

    def start(self) -> LocalSandbox:
        argv = [sys.executable, "-m", "sandbox.server", "--port", "0"]
        for name, value in self.flags.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, cwd=repo_root,
                                     env=self.env, text=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(READY_PREFIX):
                    self.url = line[len(READY_PREFIX):].strip()
                    return self
                if not line:  # stdout closed: the service exited
                    break
        log_tail = self._log_tail()
        try:
            exit_code = self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            exit_code = None
        self.stop()
        what = (f"exited with code {exit_code} before it was ready" if exit_code is not None
                else f"was not ready within {self.startup_timeout_s:g} s")
        raise RuntimeError(f"sandbox service {what}; its log ends:\n{log_tail}")

    def stop(self) -> None:
        """Stop the service (if started) and delete its log; safe to call more than once."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(_STOP_GRACE_S + float(self.flags["drain_timeout_s"]))
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()
            os.unlink(self.log_path)

    def _log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def __enter__(self) -> LocalSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
