"""Run one command in a fresh bubblewrap sandbox, under limits, and collect what it printed.

Each command gets new user, pid, network, ipc, uts and cgroup namespaces (no network at all: the new
network namespace holds only a loopback device that nobody listens on), the syscall filter of
`sandbox.seccomp`, a read-only view of /usr (less the host's /usr/local/etc) plus a short allowlist of
/etc (passwd, group and hosts are synthetic, copied in by bwrap, so no host path shows in
/proc/self/mountinfo), its own /proc and a minimal /dev, a size-capped tmpfs /tmp, and the run's
workspace at /workspace. The host's home, the repository, other workspaces and the service's
environment variables are not visible (`--clearenv`).

Process chain (one exec chain, one host pid for the service to wait on):

    setpriv --reuid ... (only as root: drops to the slot's uid)
    /bin/sh LAUNCHER  (only with cgroups: waits until the service has moved it into the run's
                       groups, then execs)
      -> bwrap ...    (sets up namespaces and mounts; pid 1 of the new pid namespace reaps)
        -> prlimit ... -- <program>   (rlimits applied inside, so they bind the program only)

When the service runs as root, the chain starts as an unprivileged per-slot uid: RLIMIT_NPROC is not
enforced for root, and an escape from the namespaces would land on a nobody uid, not on root.

When the program exits, bwrap's pid 1 exits and the kernel kills everything left in the pid
namespace; on timeout the service SIGKILLs that pid 1, with the same effect. The service is a child
subreaper, so it also reaps pid 1 itself and returns only once the namespace is empty; if the
service dies, `--die-with-parent` takes its sandboxes down. The run's cgroups (when available) are
emptied and removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import time

from sandbox.api import CommandRunResult, CommandRunStatus
from sandbox.cgroups import CgroupSet, RunGroups, RunGroupStats, RunLimits
from sandbox.hostmounts import Exposures, reachable_by_others
from sandbox.languages import Toolchain
from sandbox.seccomp import SeccompUnavailable, bpf_program

SANDBOX_UID = 1000  # the program's uid inside its user namespace
WORKSPACE = "/workspace"
# `sh -c LAUNCHER STDIN_PATH command...`, its stdin a pipe from the service: wait for the go (one line,
# written once the launcher is in its cgroups; end of file means "do not run"), then exec the command
# with the program's stdin file in place of the pipe.
LAUNCHER = 'read -r go || exit 125; exec "$@" < "$0"'
_ETC_ALLOWLIST = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "java-*")
_ETC_SYNTHETIC = {
    "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::{WORKSPACE}:/bin/sh\n",
    "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\n",
    "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
}
# Host directories under /usr that are host configuration, not toolchain: hidden behind an empty tmpfs.
HIDDEN_UNDER_USR = ("/usr/local/etc",)
_PR_SET_CHILD_SUBREAPER = 36
_KILL_GRACE_S = 2.0  # how long to wait for pipes to close after the sandbox is dead


class SandboxUnavailable(RuntimeError):
    """The host cannot run sandboxes (bubblewrap or prlimit missing, namespaces refused)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Limits of one command. `memory_bytes` bounds the memory cgroup and, when
    `limit_address_space`, RLIMIT_AS. `cpus` and `io_bytes_per_s` bind through cgroups only (0: none)."""

    timeout_s: float
    memory_bytes: int
    limit_address_space: bool
    processes: int
    open_files: int
    file_size_bytes: int
    tmpfs_bytes: int
    output_bytes: int
    cpus: float = 0.0
    io_bytes_per_s: int = 0


@dataclasses.dataclass
class Outcome:
    """A command's result plus the service's notes on why it ended as it did."""

    result: CommandRunResult
    notes: list[str] = dataclasses.field(default_factory=list)


class SandboxHost:
    """What every sandbox on this host shares: the root filesystem layout, tools, cgroup parents."""

    def __init__(self, state_dir: str, cgroups: CgroupSet, toolchains: list[Toolchain], switches_uid: bool,
                 *, seccomp: bool = True):
        """toolchains: all toolchains sandboxes will bind; switches_uid: sandboxes start as other uids
        than the service's (and the service is in its private mount namespace), so toolchains in
        private directories must be exposed to them; seccomp: apply `sandbox.seccomp`'s filter."""
        self.bwrap = shutil.which("bwrap")
        self.prlimit = shutil.which("prlimit", path="/usr/bin:/bin")
        if self.bwrap is None:
            raise SandboxUnavailable("bubblewrap (`bwrap`) is not installed: run `make system-deps` "
                                     "or `apt-get install bubblewrap`")
        if self.prlimit is None or not os.path.realpath(self.prlimit).startswith("/usr/"):
            raise SandboxUnavailable("`prlimit` (util-linux) is not installed under /usr")
        self.prlimit = os.path.realpath(self.prlimit)
        self.setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
        if switches_uid and self.setpriv is None:
            raise SandboxUnavailable("`setpriv` (util-linux) is not installed")
        self.cgroups = cgroups
        self.io_device = _block_device(state_dir)
        self.root_args = self._root_filesystem()
        self.seccomp_bpf: bytes | None = None
        self.seccomp_report = "off (--seccomp=off)"
        if seccomp:
            try:
                self.seccomp_bpf = bpf_program()
            except SeccompUnavailable as e:
                raise SandboxUnavailable(f"{e}; install libseccomp2, or start with --seccomp=off") from None
            self.seccomp_report = f"on ({len(self.seccomp_bpf) // 8} BPF instructions)"
        # host toolchain dir -> the path bwrap binds it from (see `hostmounts`)
        private = sorted({host for toolchain in toolchains for host, _ in toolchain.binds
                          if switches_uid and not reachable_by_others(host)})
        self.bind_sources = {host: os.path.join(state_dir, f"toolchain-{i}") for i, host in enumerate(private)}
        self.exposures = Exposures(self.bind_sources)

    def close(self) -> None:
        self.exposures.close()

    @staticmethod
    def _root_filesystem() -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for hidden in HIDDEN_UNDER_USR:
            if os.path.isdir(hidden):
                args += ["--size", "4096", "--perms", "0555", "--tmpfs", hidden, "--remount-ro", hidden]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):  # merged-/usr systems: /bin -> usr/bin
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for pattern in _ETC_ALLOWLIST:
            for path in sorted(glob.glob(os.path.join("/etc", pattern))):
                args += ["--ro-bind", path, path]
        return args

    def bwrap_options(self, toolchain: Toolchain, workspace: str, limits: Limits, fds: dict[str, int]) -> list[str]:
        """bwrap's options: namespaces, mounts, environment. fds: "status" (bwrap's JSON status),
        "seccomp" (the BPF program) and "/etc/<name>" (synthetic files' content) -> descriptor."""
        paths = [f"{inside}/bin" for _, inside in toolchain.binds] + ["/usr/local/bin", "/usr/bin", "/bin"]
        env = {"PATH": ":".join(paths), "HOME": WORKSPACE, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", **toolchain.env}
        sandbox = [
            "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--clearenv", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox", "--json-status-fd", str(fds["status"]), *self.root_args,
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.tmpfs_bytes), "--tmpfs", "/dev/shm",
            "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp",
            "--bind", workspace, WORKSPACE, "--chdir", WORKSPACE,
        ]
        for name in _ETC_SYNTHETIC:
            sandbox += ["--ro-bind-data", str(fds[f"/etc/{name}"]), f"/etc/{name}"]
        for host, inside in toolchain.binds:
            sandbox += ["--ro-bind", self.bind_sources.get(host, host), inside]
        if "seccomp" in fds:
            sandbox += ["--seccomp", str(fds["seccomp"])]
        sandbox += ["--remount-ro", "/"]  # the root tmpfs bwrap builds the view in: /etc, /opt, / itself
        for name, value in env.items():
            sandbox += ["--setenv", name, value]
        return sandbox

    def sandboxed_command(self, argv: list[str], limits: Limits) -> list[str]:
        """What runs inside: prlimit applying the rlimits, then the program."""
        cpu = math.ceil(limits.timeout_s) + 1  # CPU seconds, per process; the wall clock is the real bound
        rlimits = [self.prlimit, f"--cpu={cpu}:{cpu + 1}", f"--nproc={limits.processes}",
                   f"--nofile={limits.open_files}", f"--fsize={limits.file_size_bytes}", "--core=0"]
        if limits.limit_address_space:
            rlimits.append(f"--as={limits.memory_bytes}")
        return [*rlimits, "--", *argv]


def _block_device(path: str) -> str | None:
    """"major:minor" of the block device holding `path` (for I/O limits), None for virtual filesystems."""
    device = os.stat(path).st_dev
    if os.major(device) == 0:
        return None
    return f"{os.major(device)}:{os.minor(device)}"


class _Output:
    """One output pipe of a child, read to its end, keeping the first `limit` bytes and counting the rest:
    reading past the limit lets the program finish as if its output were consumed.

    The pipe is read through `loop.add_reader` on a descriptor this object alone owns and closes once,
    not through `loop.connect_read_pipe`: uvloop's pipe transport and the file object it wraps both close
    the same descriptor number (MagicStack/uvloop#763), and the second close lands on whatever another
    request opened under that number in between (its status pipe, gate or workspace)."""

    _READS_PER_WAKEUP = 16  # a program that floods its output cannot hold the event loop

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, limit: int):
        self._loop = loop
        self._fd = fd
        self._limit = limit
        self._kept = bytearray()
        self.total = 0
        self.ended = loop.create_future()  # set at end of file
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(self._READS_PER_WAKEUP):
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.close()
                self.ended.set_result(None)
                return
            self.total += len(chunk)
            if len(self._kept) < self._limit:
                self._kept += chunk[: self._limit - len(self._kept)]

    def read(self) -> tuple[bytes, int]:
        """What was read so far: (the kept bytes, total bytes seen)."""
        return bytes(self._kept), self.total

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


def _memfd(name: str, content: str | bytes) -> int:
    """An anonymous file holding `content`, positioned at its start."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, content.encode("utf-8") if isinstance(content, str) else content)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _StatusChannel:
    """bwrap's --json-status-fd: `{"child-pid": N, ...}` once the sandbox is set up (N is the host pid
    of the sandbox's pid 1), `{"exit-code": N}` when it ends."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._pending = b""
        self.records: list[dict] = []

    def poll(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 1 << 16):
                self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                self.records.append(json.loads(line))

    @property
    def child_pid(self) -> int | None:
        return next((r["child-pid"] for r in self.records if "child-pid" in r), None)

    def close_write_end(self) -> None:
        """After bwrap holds its copy; each end is closed exactly once (fd numbers get reused)."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_write_end()
        os.close(self.read_fd)


class Child:
    """A child process started by `subprocess.Popen` and awaited through a pidfd, on any event loop.

    Popen spawns with vfork (the service's page tables are not copied; uvloop's own spawn forks), and
    the pidfd turns readable when the child exits, so no watcher thread or SIGCHLD handler is needed.
    stdout and stderr are pipes read by `_Output`."""

    def __init__(self, popen: subprocess.Popen, exited: asyncio.Future, stdout: _Output, stderr: _Output):
        self._popen = popen
        self._exited = exited
        self.pid = popen.pid
        self.stdout = stdout
        self.stderr = stderr

    @classmethod
    def start(cls, command: list[str], *, stdin: object, pass_fds: tuple[int, ...], output_limit: int) -> Child:
        """Spawn `command`; its stdout and stderr are read from now on (see `_Output`), and `close()`
        releases them."""
        loop = asyncio.get_running_loop()
        pipes = [os.pipe(), os.pipe()]  # stdout, stderr: (read end, write end)
        try:
            popen = subprocess.Popen(command, stdin=stdin, stdout=pipes[0][1], stderr=pipes[1][1], pass_fds=pass_fds,
                                     start_new_session=True, env={"PATH": "/usr/bin:/bin"}, cwd="/")
        except BaseException:
            for read_fd, _ in pipes:
                os.close(read_fd)
            raise
        finally:
            for _, write_fd in pipes:
                os.close(write_fd)
        stdout, stderr = (_Output(loop, read_fd, output_limit) for read_fd, _ in pipes)
        try:
            exited = cls._watch_exit(loop, popen)
        except BaseException:  # never leave a child nobody waits for
            stdout.close()
            stderr.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        return cls(popen, exited, stdout, stderr)

    @staticmethod
    def _watch_exit(loop: asyncio.AbstractEventLoop, popen: subprocess.Popen) -> asyncio.Future:
        exited: asyncio.Future = loop.create_future()
        pidfd = os.pidfd_open(popen.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            popen.wait()  # a zombie by now: reaps at once
            if not exited.done():
                exited.set_result(popen.returncode)

        loop.add_reader(pidfd, on_exit)
        return exited

    def close(self) -> None:
        """Stop reading the output pipes (what was read stays readable); safe to call more than once."""
        self.stdout.close()
        self.stderr.close()

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped: negative for a signal, as asyncio's processes report it."""
        return self._popen.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)  # cancelling a wait leaves the exit watch in place


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _kill_sandbox(proc: Child, status: _StatusChannel) -> None:
    """Kill the sandbox's pid 1: the kernel then kills everything in its pid namespace, and bwrap,
    its parent, reaps it and exits. Killing bwrap first would orphan pid 1 to the host's init, which
    need not reap it promptly. Before the sandbox exists, kill bwrap's process group instead."""
    status.poll()
    pid = status.child_pid
    with contextlib.suppress(ProcessLookupError):
        if pid is not None and _parent_pid(pid) == proc.pid:
            os.kill(pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)


def adopt_orphans() -> None:
    """Make this process a child subreaper. bwrap's outer process exits as soon as it learns the
    program's exit code, before the sandbox's pid 1 has been reaped; pid 1 then becomes our child
    (instead of the host init's, which may leave it a zombie for long) and `_reap` collects it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


async def _reap(proc: Child, sandbox_pid: int | None) -> None:
    """Wait for bwrap, then for the sandbox's pid 1, whose exit completes only once every process in
    its pid namespace is gone."""
    try:
        await asyncio.wait_for(proc.wait(), _KILL_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    if sandbox_pid is not None:
        with contextlib.suppress(ChildProcessError):  # bwrap reaped it itself
            await asyncio.to_thread(os.waitpid, sandbox_pid, 0)


def _signal_note(return_code: int) -> str | None:
    if return_code <= 128:
        return None
    signum = return_code - 128
    if signum == signal.SIGXCPU:
        return "CPU time limit exceeded (SIGXCPU)"
    if signum == signal.SIGXFSZ:
        return "file size limit exceeded (SIGXFSZ)"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(signum).name}"
    return None


@dataclasses.dataclass
class _Finished:
    """Raw facts about a finished (or killed) command, before interpretation."""

    timed_out: bool
    sandbox_started: bool
    return_code: int  # bwrap's: the program's exit code, or 128 + signal
    elapsed: float
    stdout: tuple[bytes, int]  # (kept bytes, total bytes seen)
    stderr: tuple[bytes, int]


async def run_sandboxed(
    host: SandboxHost,
    argv: list[str],
    *,
    toolchain: Toolchain,
    workspace: str,
    limits: Limits,
    stdin_path: str | None,
    run_id: str,
    uid: int | None,
) -> Outcome:
    """Run `argv` (paths as seen inside the sandbox) and wait for it, at most `limits.timeout_s`.

    uid: host uid to run the sandbox as (None: the service's own). stdin_path: a host file fed to
    the program's stdin (None: /dev/null).
    """
    groups = await asyncio.to_thread(host.cgroups.create, run_id, RunLimits(
        max_pids=limits.processes, memory_bytes=limits.memory_bytes, cpus=limits.cpus,
        io_bytes_per_s=limits.io_bytes_per_s, io_device=host.io_device))
    stats = RunGroupStats()
    try:
        finished = await _execute(host, argv, toolchain, workspace, limits, stdin_path, groups, uid)
    finally:
        if groups is not None:
            stats = await asyncio.to_thread(groups.close)
    return _interpret(finished, stats, limits)


async def _execute(host: SandboxHost, argv: list[str], toolchain: Toolchain, workspace: str, limits: Limits,
                   stdin_path: str | None, groups: RunGroups | None, uid: int | None) -> _Finished:
    status = _StatusChannel()
    proc = None
    try:
        proc, started = await _spawn(host, argv, toolchain, workspace, limits, stdin_path, groups, uid, status)
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), limits.timeout_s)
        except TimeoutError:
            timed_out = True
            _kill_sandbox(proc, status)
        except BaseException:  # cancelled (service shutting down): the sandbox must not outlive the call
            _kill_sandbox(proc, status)
            await _reap(proc, status.child_pid)
            raise
        status.poll()
        await _reap(proc, status.child_pid)
        elapsed = time.monotonic() - started
        await asyncio.wait((proc.stdout.ended, proc.stderr.ended), timeout=_KILL_GRACE_S)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        return_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        return _Finished(timed_out, status.child_pid is not None, return_code, elapsed, stdout, stderr)
    finally:
        if proc is not None:
            proc.close()
        status.close()


async def _spawn(host: SandboxHost, argv: list[str], toolchain: Toolchain, workspace: str, limits: Limits,
                 stdin_path: str | None, groups: RunGroups | None, uid: int | None,
                 status: _StatusChannel) -> tuple[Child, float]:
    """Start the launcher/bwrap chain (inside the run's cgroups, if any); returns the process and its
    start time."""
    fds = {"status": status.write_fd}
    fds.update({f"/etc/{name}": _memfd(f"etc-{name}", content) for name, content in _ETC_SYNTHETIC.items()})
    if host.seccomp_bpf is not None:
        fds["seccomp"] = _memfd("seccomp-bpf", host.seccomp_bpf)
    # Options travel through a memfd (`--args`), so the sandbox's pid 1 shows no host paths in
    # /proc/1/cmdline; its environment is just PATH.
    fds["args"] = _memfd("bwrap-args", "".join(f"{option}\0" for option in
                                               host.bwrap_options(toolchain, workspace, limits, fds)))
    command = [host.bwrap, "--args", str(fds["args"]), "--", *host.sandboxed_command(argv, limits)]
    gate_read, gate_write = os.pipe() if groups is not None else (-1, -1)
    if groups is not None:
        command = ["/bin/sh", "-c", LAUNCHER, stdin_path or os.devnull, *command]
    if uid is not None:
        # Dropping to the slot's uid in the child (not through Popen's user=/group=) lets Python
        # spawn with vfork: a fork of the whole service would copy its page tables on every run.
        command = [host.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    try:
        with open(stdin_path or os.devnull, "rb") as stdin_file:
            started = time.monotonic()
            proc = Child.start(command, stdin=stdin_file if groups is None else gate_read,
                               pass_fds=tuple(fds.values()), output_limit=limits.output_bytes)
    except BaseException:
        if gate_write >= 0:
            os.close(gate_write)
        raise
    finally:
        status.close_write_end()
        for name, fd in fds.items():
            if name != "status":
                os.close(fd)
        if gate_read >= 0:
            os.close(gate_read)
    if groups is not None:
        try:
            await asyncio.to_thread(groups.add, proc.pid)  # a v1 migration can take milliseconds
            os.write(gate_write, b"go\n")
        except BaseException:
            os.close(gate_write)  # the launcher reads end of file and exits without running anything
            proc.close()
            await proc.wait()
            raise
        os.close(gate_write)
    return proc, started


def _interpret(finished: _Finished, stats: RunGroupStats, limits: Limits) -> Outcome:
    """SandboxFusion's view of a command, plus notes saying which limit ended it."""
    notes = []
    for name, (_, total) in (("stdout", finished.stdout), ("stderr", finished.stderr)):
        if total > limits.output_bytes:
            notes.append(f"{name} truncated to {limits.output_bytes} of {total} bytes")
    if stats.oom_killed:
        notes.append(f"memory limit exceeded: killed by the memory cgroup ({limits.memory_bytes >> 20} MiB)")
    if stats.pids_limit_hit:
        notes.append(f"process limit reached: fork refused beyond {limits.processes} tasks")
    stdout = finished.stdout[0].decode("utf-8", "replace")
    stderr = finished.stderr[0].decode("utf-8", "replace")

    if finished.timed_out:
        notes.insert(0, f"wall-clock timeout after {limits.timeout_s:g} s: sandbox killed")
        result = CommandRunResult(status=CommandRunStatus.TIME_LIMIT_EXCEEDED, execution_time=finished.elapsed,
                                  stdout=stdout, stderr=stderr)
    elif not finished.sandbox_started:
        # bwrap failed before starting the program: a service-side failure, not the program's.
        result = CommandRunResult(status=CommandRunStatus.ERROR, execution_time=finished.elapsed,
                                  return_code=finished.return_code, stdout=stdout,
                                  stderr=f"sandbox setup failed: {stderr}")
    else:
        if (note := _signal_note(finished.return_code)) and not stats.oom_killed:
            notes.append(note)
        result = CommandRunResult(status=CommandRunStatus.FINISHED, execution_time=finished.elapsed,
                                  return_code=finished.return_code, stdout=stdout, stderr=stderr)
    return Outcome(result, notes)
