"""Isolation gaps closed: the syscall filter (one test per blocked family), workspaces that cannot
escape their size cap or resist removal, setup failures that leave nothing behind, host paths that
do not show inside, and the bounds on what one request may ask for or fetch. Every program runs
through the service; the `contained` fixture checks that nothing is left and the service still serves."""

import base64
import os

from sandbox.api import RunStatus
from tests.sandbox.helpers import post, python, report

SYSCALL_PROBE = """
    import ctypes, errno, json, os, socket
    libc = ctypes.CDLL(None, use_errno=True)

    def call(number, *args):
        result = libc.syscall(number, *args)
        return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]

    def family(name):
        try:
            socket.socket(getattr(socket, name), socket.SOCK_STREAM if name != "AF_PACKET" else socket.SOCK_RAW).close()
            return "ok"
        except OSError as e:
            return errno.errorcode[e.errno]

    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    params = ctypes.create_string_buffer(120)
    print(json.dumps({{
        "seccomp_mode": status["Seccomp"].strip(),
        "{probe}": {expression},
    }}))
"""

# probe name -> (expression run inside, expected outcome). x86_64 syscall numbers.
PROBES = {
    "vsock": ("family('AF_VSOCK')", "EAFNOSUPPORT"),
    "packet": ("family('AF_PACKET')", "EAFNOSUPPORT"),
    "inet": ("family('AF_INET')", "ok"),  # allowed families still work (loopback only)
    "ptrace_traceme": ("call(101, 0, 0, 0, 0)", "EPERM"),
    "process_vm_readv": ("call(310, os.getpid(), 0, 0, 0, 0, 0)", "EPERM"),
    "io_uring_setup": ("call(425, 4, params)", "EPERM"),
    "add_key": ("call(248, b'user', b'probe', b'secret', 6, -2)", "EPERM"),
    "keyctl": ("call(250, 0, -2, 0)", "EPERM"),
    "fsopen": ("call(430, b'tmpfs', 0)", "EPERM"),
    "bpf": ("call(321, 0, 0, 0)", "EPERM"),
    "userfaultfd": ("call(323, 0)", "EPERM"),
    "perf_event_open": ("call(298, 0, 0, -1, -1, 0)", "EPERM"),
}


def probe(contained, name):
    expression, _ = PROBES[name]
    response, _ = contained(python(SYSCALL_PROBE.format(probe=name, expression=expression)))
    assert response.status == RunStatus.SUCCESS, response
    return report(response)


def test_each_blocked_syscall_family(contained):
    for name, (_, expected) in PROBES.items():
        results = probe(contained, name)
        assert results["seccomp_mode"] == "2", results  # a filter is installed
        assert results[name] == expected, (name, results)


def test_deeply_nested_workspace_is_removed(contained):
    # Deeper than PATH_MAX and made unsearchable: a path-based recursive delete fails on this.
    response, _ = contained(python("""
        import os
        for depth in range(3000):
            os.mkdir("d")
            os.chdir("d")
        open("leaf", "w").write("x")
        os.chdir("/workspace")
        os.chmod("d", 0)
        print("built")
    """, run_timeout=20))
    assert response.status == RunStatus.SUCCESS and response.run_result.stdout == "built\n"


def test_workspace_is_size_capped(contained, run):
    if "tmpfs" not in run(lambda client: client.health())["isolation"]["workspace"]:
        return  # not root: plain directory, capped per file by RLIMIT_FSIZE only (covered elsewhere)
    response, _ = contained(python("""
        import errno
        written = 0
        try:
            for i in range(64):  # 128 MiB in 2 MiB files: each under the file size limit
                with open(f"fill-{i}", "wb") as f:
                    f.write(b"z" * (2 << 20))
                written += 2
        except OSError as e:
            print(errno.errorcode[e.errno], written)
    """))
    code, written = response.run_result.stdout.split()
    assert code == "ENOSPC" and int(written) < 64  # the test service's 64 MiB workspace


def test_failed_setup_leaves_nothing_behind(contained):
    # "a" as a file and as a directory: the second write fails halfway through the setup.
    data = base64.b64encode(b"x").decode()
    response, _ = contained(python("print('never runs')", files={"a": data, "a/b": data}))
    assert response.status == RunStatus.SANDBOX_ERROR and "workspace setup failed" in response.message
    assert response.run_result is None


def test_host_paths_do_not_show_inside(contained, service, run):
    work_root = run(lambda client: client.health())["isolation"]["work_root"]
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    response, _ = contained(python("""
        import json, os
        print(json.dumps({"mountinfo": open("/proc/self/mountinfo").read(),
                          "usr_local_etc": os.listdir("/usr/local/etc") if os.path.isdir("/usr/local/etc") else None}))
    """))
    results = report(response)
    assert results["usr_local_etc"] in ([], None)
    for host_path in (work_root, repo_root, os.path.expanduser("~")):
        assert f" {host_path}" not in results["mountinfo"], host_path
    roots = {line.split()[3] for line in results["mountinfo"].splitlines()}
    assert all(root == "/" or root.startswith(("/usr", "/etc", "/newroot", "/bindfile", "/null", "/zero", "/full",
                                                "/random", "/urandom", "/tty")) for root in roots), roots


def test_fetched_files_are_capped_in_total(contained):
    response, _ = contained(python("""
        for name in ("a", "b", "c"):
            open(name, "wb").write(b"f" * (600 << 10))
        open("big", "wb").write(b"g" * (800 << 10))
    """, fetch_files=["a", "b", "big", "c"]))
    assert list(response.files) == ["a"]  # 600 KiB of the 1 MiB total; b or c would exceed it
    assert base64.b64decode(response.files["a"]) == b"f" * (600 << 10)
    assert "big left out: 819200 bytes exceed the per-file cap" in response.message
    assert "b left out: the files would exceed 1048576 bytes" in response.message


def test_too_many_test_cases_are_refused(service):
    status, body = post(service, "/run_tests", {"code": "", "language": "python", "test_cases": [{}] * 101})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "test_cases"]
