"""Hostile programs, each run through the service: every one is contained, reported with a clear
status, leaves no process, cgroup or workspace behind, and the service answers normally right after."""

import asyncio
import json
import os
import socket
import time

import pytest

from sandbox.api import CommandRunStatus, RunCodeRequest, RunStatus
from tests.sandbox.helpers import CANARY_ENV, CANARY_VALUE, python, report

TIMEOUT_S = 1.5


def test_python_fork_bomb(contained):
    response, elapsed = contained(python("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, run_timeout=TIMEOUT_S))
    assert response.status == RunStatus.FAILED
    assert response.run_result.status == CommandRunStatus.TIME_LIMIT_EXCEEDED
    assert "process limit reached" in response.message
    assert elapsed < TIMEOUT_S + 5


def test_bash_fork_bomb(contained):
    # The script itself waits out the timeout: each `:` returns as soon as it has put the next pipeline in
    # the background, so a script that ended after launching the bomb could end (and take the namespace
    # down) before a single fork was refused. The kernel refuses the bomb (RLIMIT_NPROC, or the pids
    # cgroup behind it) and nothing of it is left.
    response, elapsed = contained(RunCodeRequest(code=":(){ :|:& };:\nsleep 60", language="bash",
                                                 run_timeout=TIMEOUT_S))
    assert ("fork: retry: Resource temporarily unavailable" in response.run_result.stderr
            or "process limit reached" in response.message)
    assert elapsed < TIMEOUT_S + 5


def test_memory_bomb_is_stopped(contained, run):
    response, elapsed = contained(python("""
        chunks = []
        while True:
            chunks.append(bytearray(32 << 20))
    """, memory_limit_MB=128, run_timeout=10))
    assert response.status == RunStatus.FAILED
    assert response.run_result.status == CommandRunStatus.FINISHED
    if run(lambda client: client.health())["isolation"]["cgroup_version"] is None:
        assert "MemoryError" in response.run_result.stderr  # RLIMIT_AS, the fallback without a memory cgroup
    else:
        assert response.run_result.return_code == 128 + 9 and "memory limit exceeded" in response.message
    assert elapsed < 5  # stopped at once, not left to run into the timeout


def test_thread_pool_starts_at_the_default_memory_limit(contained):
    # RLIMIT_AS at 1 GiB stopped this (16 threads reserve 64 MiB malloc arenas each); the memory
    # cgroup counts what is used instead.
    response, _ = contained(python("""
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(16) as pool:
            print(sum(pool.map(lambda i: len(bytearray(1 << 20)) * i, range(64))))
    """))
    assert response.status == RunStatus.SUCCESS, response
    assert response.run_result.stdout == f"{sum(range(64)) << 20}\n"


def test_memory_bomb_in_tmpfs_is_killed_by_memory_cgroup(contained, run):
    health = run(lambda client: client.health())
    if not os.path.isdir(health["isolation"]["cgroups"]["memory"]):
        pytest.skip(f"no memory cgroup on this host: {health['isolation']['cgroups']['memory']}")
    # tmpfs pages are outside the address space, so only the memory cgroup can stop this one.
    response, _ = contained(python("""
        block = b"x" * (1 << 20)
        for i in range(200):  # many small files: each stays under the file size limit
            with open(f"/dev/shm/fill-{i}", "wb") as f:
                f.write(block)
    """, memory_limit_MB=64, run_timeout=10))
    assert response.status == RunStatus.FAILED
    assert response.run_result.return_code == 128 + 9
    assert "memory limit exceeded" in response.message


def test_infinite_loop_times_out(contained):
    response, elapsed = contained(python("while True:\n    pass\n", run_timeout=TIMEOUT_S))
    assert response.status == RunStatus.FAILED
    assert response.run_result.status == CommandRunStatus.TIME_LIMIT_EXCEEDED
    assert response.run_result.return_code is None
    assert TIMEOUT_S <= response.run_result.execution_time < TIMEOUT_S + 2
    assert "wall-clock timeout" in response.message


def test_sleep_past_timeout_is_killed(contained):
    # Sleeping uses no CPU, so only the wall clock catches it.
    response, elapsed = contained(python("import time\nprint('start', flush=True)\ntime.sleep(60)\n", run_timeout=TIMEOUT_S))
    assert response.run_result.status == CommandRunStatus.TIME_LIMIT_EXCEEDED
    assert response.run_result.stdout == "start\n"  # output before the kill is kept
    assert elapsed < TIMEOUT_S + 5


def test_endless_output_is_truncated(contained, service):
    response, _ = contained(python("""
        import sys
        while True:
            sys.stdout.write("x" * 65536)
    """, run_timeout=TIMEOUT_S))
    assert response.run_result.status == CommandRunStatus.TIME_LIMIT_EXCEEDED
    assert response.run_result.stdout == "x" * 65536  # the test service's max_output_bytes
    assert "stdout truncated to 65536" in response.message


def test_large_finite_output_is_truncated_but_run_completes(contained):
    response, _ = contained(python("""
        import sys
        sys.stdout.write("y" * (8 << 20))
        sys.stderr.write("e" * (1 << 20))
    """, run_timeout=10))
    assert response.status == RunStatus.SUCCESS
    assert response.run_result.stdout == "y" * 65536
    assert response.run_result.stderr == "e" * 65536
    assert f"stdout truncated to 65536 of {8 << 20} bytes" in response.message


def test_writes_outside_the_workspace_fail(contained, service):
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    marker = f"escape-{os.getpid()}-{time.time_ns()}"
    targets = ["/", "/usr", "/etc", "/root", "/home", repo_root, "/var/tmp", "/proc/sys/kernel", "/sys"]
    response, _ = contained(python(f"""
        import json, os
        results = {{}}
        for directory in {targets!r}:
            try:
                with open(os.path.join(directory, {marker!r}), "w") as f:
                    f.write("escaped")
                results[directory] = "written"
            except OSError as e:
                results[directory] = type(e).__name__
        for directory in ("/workspace", "/tmp"):  # the private, writable places
            with open(os.path.join(directory, "ok"), "w") as f:
                f.write("fine")
            results[directory] = "written"
        print(json.dumps(results))
    """))
    results = report(response)
    assert results.pop("/workspace") == results.pop("/tmp") == "written"
    assert all(outcome != "written" for outcome in results.values()), results
    for directory in targets + ["/tmp", "/var/tmp", "/dev/shm"]:
        assert not os.path.exists(os.path.join(directory, marker))


def test_file_size_limit(contained):
    response, _ = contained(python("""
        with open("big", "wb") as f:
            f.write(b"z" * (64 << 20))
    """))
    assert response.status == RunStatus.FAILED
    assert "File too large" in response.run_result.stderr  # EFBIG: Python ignores SIGXFSZ


def test_host_files_and_environment_are_invisible(contained, service, run):
    health = run(lambda client: client.health())
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    secrets = [os.path.join(repo_root, "Makefile"), os.path.expanduser("~/.bashrc"), "/etc/shadow",
               f"/proc/{os.getpid()}/environ", "/sys/kernel"]
    sandbox_init = ["/proc/1/environ", "/proc/1/cmdline"]  # the sandbox's own init: readable, but bare
    response, _ = contained(python(f"""
        import json, os
        results = {{"environ": dict(os.environ), "root": sorted(os.listdir("/")),
                    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "uid": os.getuid()}}
        for path in {secrets + sandbox_init!r}:
            try:
                with open(path, "rb") as f:
                    results[path] = f.read().decode(errors="replace")
            except OSError as e:
                results[path] = type(e).__name__
        print(json.dumps(results))
    """))
    results = report(response)
    assert CANARY_ENV not in results["environ"] and CANARY_VALUE not in json.dumps(results)
    assert set(results["environ"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "PWD"}
    assert set(results["root"]) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev",
                                    "tmp", "workspace", "opt"}
    assert results["uid"] == 1000
    assert len(results["pids"]) <= 3  # bwrap's init, the program (and prlimit's exec of it): no host processes
    if results["/proc/1/environ"] != "PermissionError":  # what the launcher chain started with: no host values
        init_environ = dict(item.split("=", 1) for item in results["/proc/1/environ"].split("\0") if item)
        assert init_environ.items() <= {"PATH": "/usr/bin:/bin", "PWD": "/", "SHLVL": "0"}.items()
    init_argv = results["/proc/1/cmdline"].split("\0")
    assert init_argv[1] == "--args" and init_argv[init_argv.index("--") + 1].endswith("prlimit")
    for host_path in (repo_root, service.log_path, os.path.dirname(health["isolation"]["work_root"])):
        assert host_path not in results["/proc/1/cmdline"]
    for path in secrets:
        assert results[path] in ("FileNotFoundError", "PermissionError"), (path, results[path])


def test_network_is_unreachable(contained, service):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    service_port = int(service.url.rsplit(":", 1)[1])
    try:
        response, _ = contained(python(f"""
            import json, socket
            results = {{"interfaces": [name for _, name in socket.if_nameindex()]}}
            for port in ({service_port}, {listener.getsockname()[1]}):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    results[str(port)] = "connected"
                except OSError as e:
                    results[str(port)] = type(e).__name__
            print(json.dumps(results))
        """))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's loopback
    finally:
        listener.close()
    results = report(response)
    assert results.pop("interfaces") == ["lo"]
    assert set(results.values()) == {"ConnectionRefusedError"}, results


def test_cannot_kill_other_processes(service, run, contained):
    victim = python("import time\ntime.sleep(1.0)\nprint('survived')\n", run_timeout=10)
    killer = python(f"""
        import os, signal
        os.kill(-1, signal.SIGKILL)  # every process this user may signal
        for pid in (1, {service.proc.pid}, {os.getpid()}, *range(2, 4096)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print("done")
    """)

    async def both(client):
        victim_task = asyncio.create_task(client.run_code(victim))
        await asyncio.sleep(0.2)  # the victim is sleeping in the other worker slot
        return await client.run_code(killer), await victim_task

    killer_response, victim_response = run(both)
    assert victim_response.status == RunStatus.SUCCESS and victim_response.run_result.stdout == "survived\n"
    # The killer may have killed its own sandbox's init (and so itself); it cannot reach anything else.
    assert killer_response.run_result.status == CommandRunStatus.FINISHED
    contained(python("print('still here')"))


def test_background_children_do_not_outlive_the_run(contained):
    response, elapsed = contained(python("""
        import os, subprocess, time
        subprocess.Popen(["sleep", "300"], start_new_session=True)
        if os.fork() == 0:  # a classic daemon: double fork, new session, parent exits
            os.setsid()
            if os.fork() == 0:
                time.sleep(300)
            os._exit(0)
        print("parent exits")
    """, run_timeout=10))
    assert response.status == RunStatus.SUCCESS and response.run_result.stdout == "parent exits\n"
    assert elapsed < 5  # nobody waited for the 300 s sleepers


def test_nohup_background_job_in_bash(contained):
    response, elapsed = contained(RunCodeRequest(code="nohup sleep 300 >/dev/null 2>&1 &\ndisown\necho left",
                                                 language="bash", run_timeout=10))
    assert response.status == RunStatus.SUCCESS and response.run_result.stdout == "left\n"
    assert elapsed < 5
