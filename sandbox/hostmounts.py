"""The service's private mount namespace, and toolchains under private directories made reachable
by the sandbox's unprivileged uids.

A root-run service moves itself into a private mount namespace at start (`private_mount_namespace`):
the mounts it makes (per-run workspace tmpfs, toolchain exposures) vanish with it, and nothing leaks
onto the host. It starts its sandboxes as per-slot uids, and bubblewrap resolves bind sources as
that uid: a rustup toolchain under /root (mode 0700) is out of its reach. The service therefore
bind-mounts each such toolchain, read-only, onto an empty directory (or, for a single file, an empty
file) under its state directory. Only the toolchain directory is exposed, never the home directory
around it.

Safety: the exposures are read-only, and `Exposures.close()` unmounts each one and removes its
mount point with rmdir or unlink (never a recursive delete), before anything cleans the state directory.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat

_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


def reachable_by_others(path: str) -> bool:
    """Whether a uid with no relation to the owners can list `path` (a directory) or read it (a file),
    searching every ancestor."""
    path = os.path.realpath(path)
    mode = os.stat(path).st_mode
    if not (mode & stat.S_IROTH and (mode & stat.S_IXOTH or not stat.S_ISDIR(mode))):
        return False
    parent = os.path.dirname(path)
    while True:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def private_mount_namespace() -> None:
    """Move this process into a mount namespace of its own, with no propagation to the host's.
    Must run before the process starts threads (unshare(CLONE_NEWNS) needs an unshared fs struct)."""
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")


class Exposures:
    """Read-only bind mounts source -> target; call `private_mount_namespace()` first."""

    def __init__(self, sources: dict[str, str]):
        self.targets: list[str] = []
        libc = _libc()
        try:
            for source, target in sources.items():
                if os.path.isdir(source):
                    os.makedirs(target, mode=0o711)
                else:  # a single file is mounted on an empty file
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))
                self.targets.append(target)
                _check(libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
                       f"bind-mounting {source} on {target}")
                _check(libc.mount(None, target.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None),
                       f"making {target} read-only")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmount and rmdir every mount point; raises if one cannot be removed, so that callers
        never delete a tree that still has a toolchain mounted inside."""
        libc = _libc()
        while self.targets:
            target = self.targets[-1]
            if target in mount_points():
                _check(libc.umount2(target.encode(), 0), f"unmounting {target}")
            if os.path.isdir(target):
                os.rmdir(target)  # fails (EBUSY) rather than removing anything if still mounted
            else:
                os.unlink(target)  # an unmounted empty file (unlink of a mount point fails with EBUSY)
            self.targets.pop()


def mount_points() -> set[str]:
    """Mount points in this process's mount namespace. (os.path.ismount misses bind mounts of a
    directory of the same filesystem: they share its device number.)"""
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point))
    return points
