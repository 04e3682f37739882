"""The syscall filter every sandboxed command runs under, built with libseccomp (through the
`pyseccomp` ctypes binding) and handed to bubblewrap as a BPF program (`bwrap --seccomp FD`).

Namespaces already hide the host's processes, files and network; this filter removes the kernel
surface they do not cover:
- socket address families other than unix, inet, inet6 and netlink (AF_VSOCK reaches the VM host
  whatever the network namespace; AF_PACKET, AF_BLUETOOTH, ... have no use here): EAFNOSUPPORT;
- ptrace and cross-process memory access, io_uring, the kernel keyring, the mount family,
  namespace changes and a list of administrative calls (modules, BPF, perf, kexec, clock, ...): EPERM.
Syscalls of another ABI than the native one (x86's int 0x80 / x32 on x86_64) kill the process, as
libseccomp does by default for architectures not in the filter.
"""

from __future__ import annotations

import errno
import os
import socket

import pyseccomp

ALLOWED_SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)

BLOCKED: dict[str, tuple[str, ...]] = {
    "ptrace": ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"),
    "io_uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    "keyring": ("add_key", "request_key", "keyctl"),
    "mount": ("mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
              "fsmount", "fspick", "mount_setattr"),
    "namespaces": ("unshare", "setns"),
    "kernel": ("bpf", "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "init_module",
               "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog",
               "settimeofday", "clock_settime", "clock_adjtime", "open_by_handle_at", "name_to_handle_at",
               "lookup_dcookie", "iopl", "ioperm", "vhangup"),
}


class SeccompUnavailable(RuntimeError):
    """libseccomp could not build the filter (library missing, or an unknown architecture)."""


# Socket families are small integers (AF_MAX is 46 on Linux 6.x); everything from here up is refused
# with one comparison, the rest one by one (libseccomp allows one comparison per argument and rule).
_FAMILY_CEILING = 64


def build_filter() -> pyseccomp.SyscallFilter:
    """The filter, ready to export or load: default allow, the rules above."""
    try:
        sandbox = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    except (OSError, AttributeError) as e:
        raise SeccompUnavailable(f"libseccomp: {e}") from None
    try:  # a binary tree over syscall numbers instead of a linear chain (libseccomp >= 2.5)
        sandbox.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass
    for names in BLOCKED.values():
        for name in names:
            try:
                sandbox.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
            except OSError as e:
                if e.errno != errno.EDOM and e.errno != errno.EINVAL:  # not a syscall of this architecture
                    raise
    refuse = pyseccomp.ERRNO(errno.EAFNOSUPPORT)
    for family in range(_FAMILY_CEILING):
        if family not in ALLOWED_SOCKET_FAMILIES:
            sandbox.add_rule(refuse, "socket", pyseccomp.Arg(0, pyseccomp.EQ, family))
    sandbox.add_rule(refuse, "socket", pyseccomp.Arg(0, pyseccomp.GE, _FAMILY_CEILING))
    sandbox.add_rule(refuse, "socketpair", pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    return sandbox


def bpf_program() -> bytes:
    """The filter as the BPF program bubblewrap's `--seccomp FD` reads."""
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb") as sink:
            build_filter().export_bpf(sink)
        with os.fdopen(read_fd, "rb") as source:
            read_fd = -1
            return source.read()
    finally:
        if read_fd >= 0:
            os.close(read_fd)
