"""A trainer told to stop (SIGTERM: a deletion, an eviction, a preemption, a suspend) saves a last checkpoint
when it can, so that a reclaimed gang loses at most the step it was in (issue 18, part 5).

    stop = StopRequest(checkpoint_dir, attempt, grace_seconds); stop.install()   # every process
    ...after each step, in the actor loop (algorithms.common.drive):
    if any rank's stop.requested():  save if every rank's can_save(...), then raise Stopped

SIGTERM does not end the process: every role keeps serving (a critic must answer the actor's "save").
Only the actor ranks decide, at a step boundary; they learn of a SIGTERM that reached another pod (only
the critic's pod was evicted) from a marker file the signalled process touches on the shared checkpoint
volume, `<dir>/.stop/attempt-<N>`. A marker older than this process (left by a gang that timed out with
the same attempt number) is not read as a stop. The kubelet's SIGKILL after terminationGracePeriodSeconds
still ends everything: a save that would not fit is not started.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_contract import wire

# Save only when the last save's duration times this still fits in the grace left.
SAVE_MARGIN = 1.5
# File times come from a coarser clock than time.time() (and another node's, on a shared volume): a marker
# this much older than the process still counts. A stale one (a gang that timed out) is minutes old.
MARKER_SLACK_SECONDS = 2.0


class Stopped(Exception):
    """The gang was told to stop; raised by the actor loop after its last checkpoint, and by a serving process
    that got SIGTERM once its actors said stop (`step` None). The process exits wire.EXIT_STOPPED."""

    def __init__(self, step: int | None = None, saved: bool = False):
        self.step, self.saved = step, saved
        if step is None:
            super().__init__("stopped on SIGTERM after the actors' last request")
        else:
            super().__init__(f"stopped after step {step} ({'checkpoint saved' if saved else 'no checkpoint saved'})")


def can_save(seconds_left: float | None, last_save_seconds: float | None, margin: float = SAVE_MARGIN) -> bool:
    """Whether a checkpoint started now ends before SIGKILL. `seconds_left`: of the grace period (None =
    not signalled here: no deadline known); `last_save_seconds`: the last save's duration in this process
    (None = none yet: try)."""
    if seconds_left is None or last_save_seconds is None:
        return seconds_left is None or seconds_left > 0
    return seconds_left > margin * last_save_seconds


class StopRequest:
    """This process's SIGTERM, and any other pod's of the same gang (the marker file)."""

    def __init__(self, checkpoint_dir: str | Path, attempt: int, grace_seconds: float,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.marker = Path(checkpoint_dir) / wire.STOP_DIR / f"attempt-{attempt}"
        self.grace_seconds = float(grace_seconds)
        self._clock, self._wall = clock, wall
        self.started = wall()
        self.signalled_at: float | None = None  # clock() of this process's SIGTERM

    def install(self) -> None:
        """Handle SIGTERM (main thread only): remember it and tell the other pods; do not exit."""
        signal.signal(signal.SIGTERM, lambda *_: self.signal())

    def signal(self) -> None:
        if self.signalled_at is None:
            self.signalled_at = self._clock()
        try:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        except OSError:
            pass  # a read-only or full volume: this process still stops

    def requested(self) -> bool:
        """This process got SIGTERM, or another process of this gang did after this one started."""
        if self.signalled_at is not None:
            return True
        try:
            return self.marker.stat().st_mtime >= self.started - MARKER_SLACK_SECONDS
        except OSError:
            return False

    def seconds_left(self) -> float | None:
        """Of the grace period since this process's SIGTERM; None when the stop came from another pod."""
        if self.signalled_at is None:
            return None
        return self.grace_seconds - (self._clock() - self.signalled_at)
