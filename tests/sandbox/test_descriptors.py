"""The service closes each descriptor of a run exactly once, on its own event loop (uvloop).

A descriptor closed twice closes, the second time, whatever another request has opened under the same
number in between. uvloop's `connect_read_pipe` does exactly that (MagicStack/uvloop#763); read through
it, a sandbox's output pipes stole other requests' descriptors under load ("sandbox error: [Errno 9] Bad
file descriptor"). This test runs many children next to a thread that keeps its own pipes busy, as the
service's other requests do, and fails when one of that thread's descriptors is closed under it."""

import asyncio
import gc
import os
import select
import subprocess
import threading

import uvloop

from sandbox.isolation import Child

RUNS, CONCURRENT, COLLECT_EVERY = 200, 4, 20


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_children_close_only_their_own_descriptors():
    stolen: list[str] = []
    stop = threading.Event()

    def other_request() -> None:
        while not stop.is_set():
            read_fd, write_fd = os.pipe()
            try:
                os.write(write_fd, b"x")
                if not select.select([read_fd], [], [], 1.0)[0] or os.read(read_fd, 1) != b"x":
                    stolen.append("a pipe lost its byte")
            except OSError as e:
                stolen.append(repr(e))
            for fd in (read_fd, write_fd):
                try:
                    os.close(fd)
                except OSError as e:
                    stolen.append(repr(e))

    async def one(i: int) -> tuple[bytes, int]:
        proc = Child.start(["/bin/sh", "-c", f"echo out{i}; echo err{i} >&2"], stdin=subprocess.DEVNULL,
                           pass_fds=(), output_limit=64)
        try:
            await proc.wait()
            await asyncio.wait((proc.stdout.ended, proc.stderr.ended), timeout=10)
            assert proc.stderr.read() == (f"err{i}\n".encode(), len(f"err{i}\n"))
            return proc.stdout.read()
        finally:
            proc.close()

    async def runs() -> None:
        for start in range(0, RUNS, CONCURRENT):
            outputs = await asyncio.gather(*(one(i) for i in range(start, start + CONCURRENT)))
            assert outputs == [(f"out{i}\n".encode(), len(f"out{i}\n")) for i in range(start, start + CONCURRENT)]
            if (start // CONCURRENT) % COLLECT_EVERY == 0:
                gc.collect()  # transports left to the collector were where the second close happened

    uvloop.run(asyncio.sleep(0))  # libuv keeps two descriptors of its own from the first loop on
    gc.collect()  # earlier tests' garbage closes its own descriptors now, not during the runs
    before = _open_descriptors()
    thread = threading.Thread(target=other_request)
    thread.start()
    try:
        uvloop.run(runs())
    finally:
        stop.set()
        thread.join()
    assert not stolen, stolen[:3]
    assert not _open_descriptors() - before  # and none leaked


def test_output_past_the_limit_is_counted_and_dropped():
    async def main() -> tuple[tuple[bytes, int], tuple[bytes, int]]:
        proc = Child.start(["/bin/sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a"], stdin=subprocess.DEVNULL,
                           pass_fds=(), output_limit=10)
        try:
            await proc.wait()
            await asyncio.wait((proc.stdout.ended, proc.stderr.ended), timeout=10)
            return proc.stdout.read(), proc.stderr.read()
        finally:
            proc.close()

    stdout, stderr = uvloop.run(main())
    assert stdout == (b"a" * 10, 300000) and stderr == (b"", 0)
