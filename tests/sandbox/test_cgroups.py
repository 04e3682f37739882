"""cgroup v2 (and the v1 fallback decision) against a fake cgroupfs: a directory tree whose `mkdir`,
writes and `rmdir` behave as the kernel's do for what `sandbox.cgroups` uses (control files appear on
mkdir, `cgroup.procs` moves a process, `cgroup.subtree_control` is refused with EBUSY while the group
has processes, `cgroup.kill` empties the group). The machine these tests run on may have no writable
v2 hierarchy; the real v1 path is exercised by every test that runs a program through the service."""

import errno
import os
import shutil

import pytest

from sandbox import cgroups
from sandbox.cgroups import RunLimits, discover_cgroups

CONTROL_FILES = {"cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.kill": "", "memory.max": "max",
                 "memory.swap.max": "max", "memory.oom.group": "0", "memory.events": "oom 0\noom_kill 0\n",
                 "pids.max": "max", "pids.events": "max 0\n", "cpu.max": "max 100000", "io.max": ""}


class FakeCgroupFs:
    def __init__(self, root: str, controllers: str, own: str, processes: list[int]):
        self.root = root
        os.makedirs(os.path.join(root, own.lstrip("/")))
        for directory in {root, os.path.join(root, own.lstrip("/"))}:
            self._fill(directory, controllers)
        self.write(os.path.join(root, own.lstrip("/"), "cgroup.procs"), "\n".join(map(str, processes)))

    def _fill(self, directory: str, controllers: str) -> None:
        for name, content in CONTROL_FILES.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(content)
        with open(os.path.join(directory, "cgroup.controllers"), "w") as f:
            f.write(controllers)

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def procs(self, group: str) -> list[str]:
        return self.read(os.path.join(group, "cgroup.procs")).split()

    def mkdir(self, path: str) -> None:
        os.mkdir(path)
        parent_enabled = self.read(os.path.join(os.path.dirname(path), "cgroup.subtree_control"))
        self._fill(path, parent_enabled)

    def write(self, path: str, value) -> None:
        group, name = os.path.split(path)
        value = str(value)
        if name == "cgroup.procs":  # a process lives in exactly one group
            for directory, _, files in os.walk(self.root):
                if "cgroup.procs" in files and value in self.procs(directory):
                    with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                        f.write("\n".join(p for p in self.procs(directory) if p != value))
            value = "\n".join(self.procs(group) + [value])
        elif name == "cgroup.subtree_control":
            if self.procs(group):
                raise OSError(errno.EBUSY, "no internal processes")
            value = " ".join(sorted(token[1:] for token in value.split()))
        elif name == "cgroup.kill":
            name, value = "cgroup.procs", ""
        with open(os.path.join(group, name), "w") as f:
            f.write(value)

    def rmdir(self, path: str) -> None:
        if self.procs(path) or any(os.path.isdir(os.path.join(path, e)) for e in os.listdir(path)):
            raise OSError(errno.EBUSY, "busy")
        shutil.rmtree(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    def make(controllers="cpuset cpu io memory pids", processes=(1, 42)):
        fs = FakeCgroupFs(str(tmp_path / "cgroup"), controllers, "/kubepods/pod1", list(processes))
        (tmp_path / "mountinfo").write_text(
            f"30 25 0:26 / {fs.root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
            f"31 25 0:27 / /proc rw - proc proc rw\n")
        (tmp_path / "cgroup_of_self").write_text("0::/kubepods/pod1\n")
        monkeypatch.setattr(cgroups, "_write", fs.write)
        monkeypatch.setattr(cgroups, "_make_group", fs.mkdir)
        monkeypatch.setattr(cgroups, "_remove_dir", fs.rmdir)
        found = discover_cgroups("codelm-sandbox-7", mountinfo=str(tmp_path / "mountinfo"),
                                 proc_cgroup=str(tmp_path / "cgroup_of_self"))
        return fs, found
    return make


def test_v2_delegates_controllers_after_moving_the_service_into_a_leaf(fake):
    fs, found = fake()
    base = os.path.join(fs.root, "kubepods/pod1")
    assert found.version == 2 and found.has_memory
    assert fs.procs(base) == [] and fs.procs(os.path.join(base, "service")) == ["1", "42"]
    assert fs.read(os.path.join(base, "cgroup.subtree_control")) == "cpu io memory pids"
    service = os.path.join(base, "codelm-sandbox-7")
    assert found.parents == {"unified": service}
    assert found.report == {"memory": service, "pids": service, "cpu": service, "io": service}


def test_v2_run_group_limits_stats_and_removal(fake):
    fs, found = fake()
    limits = RunLimits(max_pids=64, memory_bytes=256 << 20, cpus=1.5, io_bytes_per_s=10 << 20, io_device="8:0")
    groups = found.create("slot0-1", limits)
    (path,) = groups.paths.values()
    written = {name: fs.read(os.path.join(path, name)) for name in
               ("pids.max", "memory.max", "memory.swap.max", "memory.oom.group", "cpu.max", "io.max")}
    assert written == {"pids.max": "64", "memory.max": str(256 << 20), "memory.swap.max": "0",
                       "memory.oom.group": "1", "cpu.max": "150000 100000",
                       "io.max": f"8:0 rbps={10 << 20} wbps={10 << 20}"}
    groups.add(4242)
    assert fs.procs(path) == ["4242"]
    with open(os.path.join(path, "memory.events"), "w") as f:  # what the kernel reports after an OOM kill
        f.write("oom 1\noom_kill 1\noom_group_kill 1\n")
    with open(os.path.join(path, "pids.events"), "w") as f:
        f.write("max 3\n")
    stats = groups.close()
    assert (stats.oom_killed, stats.pids_limit_hit, stats.leftover_killed) == (True, True, 1)
    assert not os.path.exists(path)
    found.remove()
    assert not os.path.exists(os.path.join(fs.root, "kubepods/pod1/codelm-sandbox-7"))


def test_v2_without_memory_controller_falls_back_and_says_why(fake):
    _, found = fake(controllers="cpu io pids")  # memory bound to a v1 hierarchy (hybrid host)
    assert found.version is None  # no v1 hierarchy in the fake mountinfo either
    assert "lacks controllers ['memory']" in found.report["v2"]


def test_limits_without_cpu_or_io_leave_those_files_alone(fake):
    fs, found = fake()
    groups = found.create("slot1-2", RunLimits(max_pids=8, memory_bytes=None))
    (path,) = groups.paths.values()
    assert fs.read(os.path.join(path, "cpu.max")) == "max 100000" and fs.read(os.path.join(path, "io.max")) == ""
    assert fs.read(os.path.join(path, "memory.max")) == "max"
    groups.close()
