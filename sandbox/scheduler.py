"""Bounded concurrency with a bounded queue: `workers` slots, at most `max_queue` waiters.

A request that would make the queue longer than `max_queue` is refused at once (`Overloaded`), so an
overloaded service answers 503 in microseconds instead of letting clients hang; clients retry with
backoff. Slots are numbered: slot i runs its sandboxes as its own host uid (see `Executor.slot_uid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator


class Overloaded(Exception):
    """All workers are busy and the queue is full."""


@dataclasses.dataclass
class PoolStats:
    workers: int
    max_queue: int
    running: int = 0
    queued: int = 0
    completed: int = 0
    rejected: int = 0


class WorkerPool:
    def __init__(self, workers: int, max_queue: int):
        self.stats = PoolStats(workers=workers, max_queue=max_queue)
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(workers):
            self._free.put_nowait(slot)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """Wait for a free slot and hold it for the duration of the block; raise `Overloaded` when
        the queue is already full."""
        stats = self.stats
        if self._free.empty() and stats.queued >= stats.max_queue:
            stats.rejected += 1
            raise Overloaded(f"{stats.running} running, {stats.queued} queued (max {stats.max_queue})")
        stats.queued += 1
        try:
            slot = await self._free.get()
        finally:
            stats.queued -= 1
        stats.running += 1
        try:
            yield slot
        finally:
            stats.running -= 1
            stats.completed += 1
            self._free.put_nowait(slot)
