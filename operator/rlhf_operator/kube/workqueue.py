"""The reconcile work queue: job keys waiting for a pass, as in controller-runtime's workqueue."""

from __future__ import annotations

import asyncio

from rlhf_operator.kube.observe import JobKey

# Retry delays after an API error: doubling from 0.5 s up to a minute.
ERROR_BACKOFF_BASE = 0.5
ERROR_BACKOFF_MAX = 60.0


def error_backoff(failures: int) -> float:
    return min(ERROR_BACKOFF_MAX, ERROR_BACKOFF_BASE * 2 ** max(0, failures - 1))


class WorkQueue:
    """Job keys waiting for a pass: each queued at most once, processed by one worker at a time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[JobKey] = asyncio.Queue()
        self._queued: set[JobKey] = set()
        self._active: set[JobKey] = set()
        self._dirty: set[JobKey] = set()
        self._timers: dict[JobKey, tuple[float, asyncio.TimerHandle]] = {}

    def add(self, key: JobKey) -> None:
        if key in self._active:
            self._dirty.add(key)  # one more pass once the running one ends
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: JobKey, delay: float) -> None:
        """Enqueue after `delay` seconds; an earlier pending wake-up wins over a later one."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending and pending[0] <= due:
            return
        if pending:
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._wake, key))

    def _wake(self, key: JobKey) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> JobKey:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: JobKey) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def forget(self, key: JobKey) -> None:
        pending = self._timers.pop(key, None)
        if pending:
            pending[1].cancel()
        self._dirty.discard(key)

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)
