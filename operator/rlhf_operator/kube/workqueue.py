"""The reconcile work queue: job keys waiting for a pass, as in controller-runtime's workqueue."""

from __future__ import annotations

import asyncio

from rlhf_operator.kube.observe import JobKey

# Retry delays after a failed pass: an envelope doubling from 0.5 s up to a minute, full jitter below it.
ERROR_BACKOFF_BASE = 0.5
ERROR_BACKOFF_MAX = 60.0
# The API server's Retry-After (429 from priority and fairness, 503) is honoured up to this many seconds.
RETRY_AFTER_MAX = 300.0
THROTTLED = (429, 503)


def error_backoff(failures: int) -> float:
    """The backoff envelope after `failures` failed passes in a row: 0.5 s doubling, capped at a minute."""
    return min(ERROR_BACKOFF_MAX, ERROR_BACKOFF_BASE * 2 ** min(64, max(0, failures - 1)))


def retry_delay(failures: int, status: int, retry_after: float | None, draw: float) -> float:
    """Seconds to wait before the next pass of a job whose last `failures` passes failed, the last one on an
    answer of HTTP `status` (0: no answer) carrying `retry_after` seconds (its Retry-After header, or None).

    - Throttled (429, 503) with a Retry-After: at least what the server asked (capped at RETRY_AFTER_MAX),
      plus up to ERROR_BACKOFF_BASE of jitter so that jobs throttled together do not come back together.
    - Anything else (5xx, 409 conflicts, no answer, a 429 without Retry-After): "full jitter", uniform in
      [0, error_backoff(failures)) (M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog,
      2015; client-go's wait.Backoff jitters the same envelope).

    `draw` is a uniform random number in [0, 1) (random.random()), passed in so the decision stays pure.
    Raises ValueError for failures < 1 or a draw outside [0, 1).
    """
    if failures < 1:
        raise ValueError(f"failures must be >= 1 (a delay is for a failed pass), got {failures}")
    if not 0.0 <= draw < 1.0:
        raise ValueError(f"draw must be in [0, 1), got {draw}")
    if status in THROTTLED and retry_after is not None:
        return min(RETRY_AFTER_MAX, max(0.0, retry_after)) + draw * ERROR_BACKOFF_BASE
    return draw * error_backoff(failures)


class WorkQueue:
    """Job keys waiting for a pass: each queued at most once, processed by one worker at a time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[JobKey] = asyncio.Queue()
        self._queued: set[JobKey] = set()
        self._active: set[JobKey] = set()
        self._dirty: set[JobKey] = set()
        self._timers: dict[JobKey, tuple[float, asyncio.TimerHandle]] = {}
        self._held: dict[JobKey, float] = {}  # key -> loop time before which it is not processed

    def add(self, key: JobKey) -> None:
        held = self._held.get(key)
        if held is not None:
            wait = held - asyncio.get_running_loop().time()
            if wait > 0.001:
                self.add_after(key, wait)  # events meanwhile collapse into the pass at the hold's end
                return
            del self._held[key]
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

    def hold(self, key: JobKey, delay: float) -> None:
        """Process `key` no sooner than `delay` seconds from now, whatever events come meanwhile (the API
        server's Retry-After), and once then."""
        self._held[key] = asyncio.get_running_loop().time() + delay
        self.add_after(key, delay)

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
        self._held.pop(key, None)

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)
