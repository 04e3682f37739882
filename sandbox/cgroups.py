"""Per-command control groups: memory, pids, CPU and I/O limits beyond rlimits, a record of what the
kernel refused or killed, and a way to kill every process a command left behind.

Both hierarchies are supported:
- cgroup v2 (unified; every current distribution and GKE node): one group per command under
  `<the service's cgroup>/codelm-sandbox-<pid>/<run id>` with `memory.max`, `memory.swap.max = 0`,
  `memory.oom.group = 1` (an out-of-memory kill takes the whole run), `pids.max`, `cpu.max`, `io.max`;
  leftovers are killed through `cgroup.kill`. v2 forbids processes in a group whose controllers are
  delegated to children, so the service first moves the processes of its own cgroup into a leaf
  `<own>/service` (what container init systems do); it needs write access to its cgroup (root in a
  private cgroup namespace, or a delegated subtree).
- cgroup v1: one group per controller (`pids`, `memory`, `cpu`, `blkio`) under the service's own group
  in each hierarchy, with the v1 names of the same limits.

v2 is used when its hierarchy has the memory and pids controllers; else v1 where mounted and
writable; else none (rlimits only), reported on /health. The service (root) moves each command's
launcher into its groups before the launcher execs bubblewrap (see `isolation.py`), so everything the
command starts is inside them.

Filesystem locations come from `/proc/self/mountinfo` and `/proc/self/cgroup`; `discover_cgroups`
takes other paths for tests against a fake cgroupfs tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import time

V1_CONTROLLERS = ("pids", "memory", "cpu", "blkio")
V2_REQUIRED = ("memory", "pids")
V2_OPTIONAL = ("cpu", "io")
CPU_PERIOD_US = 100_000
V2_LEAF = "service"


@dataclasses.dataclass(frozen=True)
class RunLimits:
    """Limits of one command's groups. cpus: CPU quota in CPUs (0: none); io_bytes_per_s: read and
    write bandwidth on `io_device` ("major:minor"; 0 or None: none)."""

    max_pids: int
    memory_bytes: int | None
    cpus: float = 0.0
    io_bytes_per_s: int = 0
    io_device: str | None = None


@dataclasses.dataclass
class RunGroupStats:
    """What the kernel refused or killed during one command."""

    pids_limit_hit: bool = False
    oom_killed: bool = False
    leftover_killed: int = 0


def _write(path: str, value: str | int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _make_group(path: str) -> None:
    """mkdir in a cgroup filesystem (the kernel fills in the control files)."""
    os.mkdir(path)


def _ensure_group(path: str) -> None:
    if not os.path.isdir(path):
        _make_group(path)


def _remove_dir(path: str) -> None:
    os.rmdir(path)


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _kill_all(group: str, deadline_s: float = 5.0) -> int:
    """SIGKILL every process in `group` (through `cgroup.kill` where the kernel has it) until it is
    empty; returns how many processes were found."""
    procs = os.path.join(group, "cgroup.procs")
    found = 0
    deadline = time.monotonic() + deadline_s
    while True:
        pids = [int(p) for p in _read(procs).split()]
        if not pids:
            return found
        found += len(pids)
        kill_file = os.path.join(group, "cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, 1)
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {group} survive SIGKILL")
        time.sleep(0.005)


def _remove_group(group: str) -> None:
    """Kill what is inside, then rmdir (retrying while the kernel releases the killed tasks)."""
    _kill_all(group)
    for _ in range(200):
        try:
            _remove_dir(group)
            return
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.005)
    _remove_dir(group)


@dataclasses.dataclass(frozen=True)
class _Mount:
    fstype: str
    point: str
    root: str  # the hierarchy path shown at this mount point
    super_options: tuple[str, ...]


def _mounts(mountinfo: str) -> list[_Mount]:
    mounts = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            mounts.append(_Mount(fields[separator + 1], fields[4], fields[3], tuple(fields[separator + 3].split(","))))
    return mounts


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """hierarchy key -> this process's cgroup path: v1 controller names, and "" for v2."""
    paths: dict[str, str] = {}
    with open(proc_cgroup) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _under(mount: _Mount, own_path: str) -> str | None:
    """The directory of cgroup `own_path` below `mount`, or None when the mount does not show it."""
    root = mount.root.rstrip("/")
    if own_path != mount.root and not own_path.startswith(root + "/"):
        return None
    return os.path.join(mount.point, own_path[len(root):].lstrip("/"))


class RunGroups:
    """The groups of one sandboxed command. `add(pid)` moves a process in; `close()` kills anything
    left, removes the groups and returns the stats."""

    def __init__(self, version: int, paths: dict[str, str]):
        self.version = version
        self.paths = paths  # controller (v1) or "unified" (v2) -> group directory

    def add(self, pid: int) -> None:
        for path in self.paths.values():
            _write(os.path.join(path, "cgroup.procs"), pid)

    def close(self) -> RunGroupStats:
        stats = RunGroupStats()
        for key, path in self.paths.items():
            stats.leftover_killed += _kill_all(path)
            if key in ("pids", "unified"):
                stats.pids_limit_hit |= _counter(_read(os.path.join(path, "pids.events")), "max") > 0
            if key == "memory":
                stats.oom_killed |= _counter(_read(os.path.join(path, "memory.oom_control")), "oom_kill") > 0
            if key == "unified":
                stats.oom_killed |= _counter(_read(os.path.join(path, "memory.events")), "oom_kill") > 0
            _remove_group(path)
        return stats


class CgroupSet:
    """The service's parent groups: where every command's groups are created.
    version: 2, 1, or None (no usable cgroups); report: controller -> parent path, or why not."""

    def __init__(self, version: int | None, parents: dict[str, str], report: dict[str, str]):
        self.version = version
        self.parents = parents
        self.report = report

    @classmethod
    def disabled(cls, reason: str) -> CgroupSet:
        return cls(None, {}, {controller: reason for controller in ("pids", "memory", "cpu", "io")})

    @property
    def has_memory(self) -> bool:
        return "memory" in self.parents or "unified" in self.parents

    def create(self, run_id: str, limits: RunLimits) -> RunGroups | None:
        """The command's groups with `limits` written, or None without cgroups."""
        if self.version is None:
            return None
        paths: dict[str, str] = {}
        try:
            for key, parent in self.parents.items():
                io_limited = bool(limits.io_bytes_per_s and limits.io_device)
                if key == "cpu" and limits.cpus <= 0 or key == "blkio" and not io_limited:
                    continue  # v1 groups cost a mkdir/rmdir each: only where there is a limit to apply
                path = os.path.join(parent, run_id)
                _make_group(path)
                paths[key] = path
                for name, value in (_v2_files(limits) if key == "unified" else _v1_files(key, limits)):
                    target = os.path.join(path, name)
                    if os.path.exists(target) or name in _REQUIRED_FILES:
                        _write(target, value)
        except BaseException:
            for path in paths.values():
                _remove_group(path)
            raise
        return RunGroups(self.version, paths)

    def remove(self) -> None:
        """Remove the service's groups (and any run group still inside)."""
        for parent in self.parents.values():
            if not os.path.isdir(parent):
                continue
            for entry in os.listdir(parent):
                child = os.path.join(parent, entry)
                if os.path.isdir(child):
                    _remove_group(child)
            _remove_group(parent)


_REQUIRED_FILES = ("pids.max", "memory.max", "memory.limit_in_bytes")


def _v2_files(limits: RunLimits) -> list[tuple[str, str | int]]:
    files: list[tuple[str, str | int]] = [("pids.max", limits.max_pids)]
    if limits.memory_bytes is not None:
        files += [("memory.max", limits.memory_bytes), ("memory.swap.max", 0), ("memory.oom.group", 1)]
    if limits.cpus > 0:
        files.append(("cpu.max", f"{round(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}"))
    if limits.io_bytes_per_s > 0 and limits.io_device:
        files.append(("io.max", f"{limits.io_device} rbps={limits.io_bytes_per_s} wbps={limits.io_bytes_per_s}"))
    return files


def _v1_files(controller: str, limits: RunLimits) -> list[tuple[str, str | int]]:
    if controller == "pids":
        return [("pids.max", limits.max_pids)]
    if controller == "memory" and limits.memory_bytes is not None:
        # memsw exists only with swap accounting on: then forbid swapping past the limit too.
        return [("memory.limit_in_bytes", limits.memory_bytes), ("memory.memsw.limit_in_bytes", limits.memory_bytes)]
    if controller == "cpu" and limits.cpus > 0:
        return [("cpu.cfs_period_us", CPU_PERIOD_US), ("cpu.cfs_quota_us", round(limits.cpus * CPU_PERIOD_US))]
    if controller == "blkio" and limits.io_bytes_per_s > 0 and limits.io_device:
        rate = f"{limits.io_device} {limits.io_bytes_per_s}"
        return [("blkio.throttle.read_bps_device", rate), ("blkio.throttle.write_bps_device", rate)]
    return []


def discover_cgroups(service_id: str, *, mountinfo: str = "/proc/self/mountinfo",
                     proc_cgroup: str = "/proc/self/cgroup") -> CgroupSet:
    """Create the service's parent groups: v2 if its hierarchy has memory and pids, else v1."""
    mounts, own = _mounts(mountinfo), _own_paths(proc_cgroup)
    v2, why_not_v2 = _discover_v2(mounts, own, service_id)
    if v2 is not None:
        return v2
    v1 = _discover_v1(mounts, own, service_id)
    if v1.version is None:
        v1.report["v2"] = why_not_v2
    return v1


def _discover_v2(mounts: list[_Mount], own: dict[str, str], service_id: str) -> tuple[CgroupSet | None, str]:
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is None or "" not in own:
        return None, "no cgroup v2 hierarchy mounted"
    base = _under(unified, own[""])
    if base is None:
        return None, f"own cgroup {own['']} is outside the mounted v2 hierarchy {unified.root}"
    available = _read(os.path.join(base, "cgroup.controllers")).split()
    missing = [c for c in V2_REQUIRED if c not in available]
    if missing:
        return None, f"cgroup v2 at {base} lacks controllers {missing} (they may be bound to v1)"
    wanted = [c for c in V2_REQUIRED + V2_OPTIONAL if c in available]
    try:
        _delegate(base, wanted)
        service = os.path.join(base, service_id)
        _ensure_group(service)
        _write(os.path.join(service, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
    except OSError as e:
        return None, f"cannot set up cgroup v2 under {base}: {e.strerror or e}"
    report = {c: service if c in wanted else "not enabled in this cgroup" for c in V2_REQUIRED + V2_OPTIONAL}
    return CgroupSet(2, {"unified": service}, report), ""


def _delegate(base: str, controllers: list[str]) -> None:
    """Enable `controllers` for the children of `base`. If `base` holds processes (the service
    itself), v2 refuses (EBUSY): move them into the leaf `base/service` first."""
    enable = " ".join(f"+{c}" for c in controllers)
    try:
        _write(os.path.join(base, "cgroup.subtree_control"), enable)
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
    leaf = os.path.join(base, V2_LEAF)
    _ensure_group(leaf)
    for pid in _read(os.path.join(base, "cgroup.procs")).split():
        with contextlib.suppress(ProcessLookupError):
            _write(os.path.join(leaf, "cgroup.procs"), pid)
    _write(os.path.join(base, "cgroup.subtree_control"), enable)


def _discover_v1(mounts: list[_Mount], own: dict[str, str], service_id: str) -> CgroupSet:
    parents, report = {}, {}
    for controller in V1_CONTROLLERS:
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.super_options), None)
        name = "io" if controller == "blkio" else controller
        if mount is None or controller not in own:
            report[name] = f"no cgroup v1 `{controller}` hierarchy mounted"
            continue
        base = _under(mount, own[controller])
        if base is None:
            report[name] = f"own {controller} cgroup {own[controller]} is outside the mounted hierarchy {mount.root}"
            continue
        path = os.path.join(base, service_id)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            report[name] = f"cannot create {path}: {e.strerror}"
            continue
        parents[controller] = report[name] = path
    return CgroupSet(1 if parents else None, parents, report)
