"""A run's workspace: the host directory bound at /workspace in each of its sandboxes.

When the service runs as root (in its private mount namespace, see `hostmounts`), the workspace is a
tmpfs of `workspace_size_mb`, owned by the slot's uid: a program cannot fill the host's disk, the
sandbox's /proc/self/mountinfo shows no host path for it, and removing it is an unmount, whatever the
program left inside. Otherwise it is a plain directory, removed by `remove_tree`, which neither
recurses nor builds long paths, so no nesting depth or mode bits a program chose can make it fail.

Creation is all-or-nothing: if writing the program or its files fails, what was made is removed and
`WorkspaceSetupError` raised. Stdin files live beside the workspace, out of the sandbox's sight.
"""

from __future__ import annotations

import base64
import ctypes
import itertools
import os
import stat
import tempfile

from sandbox.hostmounts import mount_points

_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2


class WorkspaceSetupError(RuntimeError):
    """The workspace could not be created; nothing of it is left."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(path: str, size_bytes: int, uid: int) -> None:
    options = f"size={size_bytes},mode=0700,uid={uid},gid={uid}".encode()
    if _libc().mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mounting a tmpfs on {path}: {os.strerror(error)}")


def _unmount(path: str) -> None:
    if _libc().umount2(path.encode(), _MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unmounting {path}: {os.strerror(error)}")


def _open_dir(name: str, dir_fd: int | None) -> int:
    """Open a directory without following a symlink; make it searchable first if it is not."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, stat.S_IRWXU, dir_fd=dir_fd, follow_symlinks=False)
        return os.open(name, flags, dir_fd=dir_fd)


def remove_tree(path: str, *, refuse_mounts: bool = False) -> None:
    """Delete `path` and everything below it, iteratively and by file descriptor: depth-first with one
    open directory at a time, so nesting depth and path length do not matter. With `refuse_mounts`,
    refuse (before deleting anything) when something is still mounted below `path`."""
    if refuse_mounts:
        mounted = [point for point in mount_points() if point.startswith(path.rstrip("/") + "/")]
        if mounted:
            raise RuntimeError(f"not removing {path}: {mounted} still mounted inside")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    names: list[str] = []  # the path from `path` down to the open directory
    fd = _open_dir(path, None)
    try:
        while True:
            subdirectory = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subdirectory = subdirectory or entry.name
                    else:
                        os.unlink(entry.name, dir_fd=fd)
            if subdirectory is not None:
                child = _open_dir(subdirectory, fd)
                os.close(fd)
                fd = child
                names.append(subdirectory)
                continue
            if not names:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


class Workspace:
    """`path` is bound at /workspace; `root` (mode 0711) holds it and the stdin files."""

    def __init__(self, root: str, path: str, on_tmpfs: bool, max_fetch_bytes: int, max_fetch_total_bytes: int):
        self.root = root
        self.path = path
        self.on_tmpfs = on_tmpfs
        self.max_fetch_bytes = max_fetch_bytes
        self.max_fetch_total_bytes = max_fetch_total_bytes
        self._stdin_files = itertools.count()

    @classmethod
    def create(cls, work_root: str, files: dict[str, bytes], *, uid: int | None, size_bytes: int,
               on_tmpfs: bool, max_fetch_bytes: int, max_fetch_total_bytes: int) -> Workspace:
        """A workspace holding `files` (relative path -> content), owned by `uid` (None: the service's)."""
        root = tempfile.mkdtemp(prefix="run-", dir=work_root)
        workspace = cls(root, os.path.join(root, "workspace"), on_tmpfs, max_fetch_bytes, max_fetch_total_bytes)
        try:
            os.chmod(root, 0o711)  # the slot uid's bwrap must reach `workspace`; it cannot list stdin files
            os.mkdir(workspace.path, 0o700)
            if on_tmpfs:
                _mount_tmpfs(workspace.path, size_bytes, os.getuid() if uid is None else uid)
            for relative, content in files.items():
                workspace._write(relative, content)
            if uid is not None:
                for directory, _, names in os.walk(workspace.path):
                    os.chown(directory, uid, uid)
                    for name in names:
                        os.chown(os.path.join(directory, name), uid, uid, follow_symlinks=False)
        except OSError as e:
            workspace.remove()
            raise WorkspaceSetupError(f"workspace setup failed: {e}") from e
        return workspace

    def _write(self, relative: str, content: bytes) -> None:
        target = os.path.join(self.path, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)

    def stdin_file(self, stdin: str | None) -> str | None:
        if stdin is None:
            return None
        path = os.path.join(self.root, f"stdin-{next(self._stdin_files)}")
        with open(path, "wb") as f:
            f.write(stdin.encode("utf-8"))
        return path

    def fetch(self, relatives: list[str]) -> tuple[dict[str, str], list[str]]:
        """Requested files, base64-encoded, and notes on those left out. Everything in the workspace
        was written by the sandboxed program, which is dead by now: a path is fetched only if it
        resolves to a regular file inside the workspace (no symlink out to the host), and only within
        the per-file and per-request size caps."""
        fetched: dict[str, str] = {}
        notes: list[str] = []
        total = 0
        base = os.path.realpath(self.path)
        for relative in relatives:
            target = os.path.realpath(os.path.join(self.path, relative))
            if os.path.commonpath([base, target]) != base or not os.path.isfile(target):
                continue
            size = os.path.getsize(target)
            if size > self.max_fetch_bytes:
                notes.append(f"fetch_files: {relative} left out: {size} bytes exceed the per-file cap "
                             f"{self.max_fetch_bytes}")
                continue
            if total + size > self.max_fetch_total_bytes:
                notes.append(f"fetch_files: {relative} left out: the files would exceed "
                             f"{self.max_fetch_total_bytes} bytes")
                continue
            total += size
            with open(target, "rb") as f:
                fetched[relative] = base64.b64encode(f.read()).decode("ascii")
        return fetched, notes

    def remove(self) -> None:
        """Unmount (when a tmpfs) and delete everything; safe to call on a half-made workspace."""
        mounted = {point for point in mount_points() if point.startswith(self.root + "/")}  # read once
        if self.on_tmpfs and self.path in mounted:
            _unmount(self.path)  # lazily: nothing can be mounted below it (the sandbox has its own namespace)
            mounted.discard(self.path)
        if mounted:
            raise RuntimeError(f"not removing {self.root}: {sorted(mounted)} still mounted inside")
        remove_tree(self.root)
