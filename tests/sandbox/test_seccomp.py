"""The filter itself, loaded in a forked child of the test process: the mount family and namespace
changes are refused even with the privileges that would otherwise allow them (the child is root in
a throwaway mount namespace, so a call that slipped through would change nothing on the host)."""

import ctypes
import json
import os
import tempfile

import pyseccomp
import pytest

from sandbox.seccomp import BLOCKED, build_filter

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_REC, MS_PRIVATE = 16384, 1 << 18


def _attempts(libc: ctypes.CDLL, target: bytes) -> dict[str, int]:
    """errno of each privileged call (0: it succeeded), undoing what succeeded."""
    def outcome(result: int) -> int:
        return 0 if result == 0 else ctypes.get_errno()

    results = {"mount": outcome(libc.mount(b"none", target, b"tmpfs", 0, None))}
    if results["mount"] == 0:
        libc.umount2(target, 0)
    results["fsopen"] = 0 if libc.syscall(430, b"tmpfs", 0) >= 0 else ctypes.get_errno()
    results["chroot"] = outcome(libc.chroot(b"/"))
    results["unshare"] = outcome(libc.unshare(CLONE_NEWUTS))
    return results


def _in_child(load_filter: bool) -> dict[str, int]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.unshare(CLONE_NEWNS) == 0 and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
            if load_filter:
                build_filter().load()
            with tempfile.TemporaryDirectory() as target:
                os.write(write_fd, json.dumps(_attempts(libc, target.encode())).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(output)


@pytest.mark.skipif(os.geteuid() != 0, reason="the control needs the privileges the filter takes away")
def test_mount_family_and_namespaces_are_refused_even_to_root():
    assert _in_child(load_filter=False) == {"mount": 0, "fsopen": 0, "chroot": 0, "unshare": 0}  # the control
    assert set(_in_child(load_filter=True).values()) == {1}  # EPERM for every one


def test_every_blocked_name_is_a_syscall_of_this_machine():
    arch = pyseccomp.system_arch()
    unknown = [name for names in BLOCKED.values() for name in names if pyseccomp.resolve_syscall(arch, name) < 0]
    assert unknown == []
