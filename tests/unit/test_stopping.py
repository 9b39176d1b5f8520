"""rlhf_trainer.stopping: when a stopped trainer still saves, and how a SIGTERM reaches the actor ranks."""

import os
import signal

import pytest
from rlhf_contract import wire
from rlhf_trainer.stopping import Stopped, StopRequest, can_save

CAN_SAVE = {
    "signalled elsewhere: no deadline known here": (None, 12.0, True),
    "no save measured yet: try while time is left": (5.0, None, True),
    "no time left at all": (0.0, None, False),
    "the last save fits with its margin": (20.0, 10.0, True),
    "the last save does not fit with its margin": (14.0, 10.0, False),
}


@pytest.mark.parametrize("name", CAN_SAVE)
def test_can_save(name):
    left, last, want = CAN_SAVE[name]
    assert can_save(left, last) is want


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_own_sigterm_starts_the_grace_clock_and_marks_the_gang(tmp_path):
    clock, wall = Clock(), Clock(1000.0)
    stop = StopRequest(tmp_path, attempt=3, grace_seconds=30, clock=clock, wall=wall)
    assert not stop.requested() and stop.seconds_left() is None
    stop.signal()
    clock.now += 12
    assert stop.requested()
    assert stop.seconds_left() == pytest.approx(18)
    assert (tmp_path / wire.STOP_DIR / "attempt-3").is_file()
    clock.now += 5
    stop.signal()  # a second SIGTERM does not restart the clock
    assert stop.seconds_left() == pytest.approx(13)


def test_a_peer_marker_stops_only_processes_of_its_gang_started_before_it(tmp_path):
    peer = StopRequest(tmp_path, attempt=1, grace_seconds=30)
    here = StopRequest(tmp_path, attempt=1, grace_seconds=30)
    other_attempt = StopRequest(tmp_path, attempt=2, grace_seconds=30)
    peer.signal()
    assert here.requested() and here.seconds_left() is None
    assert not other_attempt.requested()
    marker = tmp_path / wire.STOP_DIR / "attempt-1"
    os.utime(marker, (here.started - 60, here.started - 60))  # left by a gang that timed out earlier
    assert not here.requested()


def test_sigterm_is_handled_not_fatal(tmp_path):
    stop = StopRequest(tmp_path, attempt=0, grace_seconds=30)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stopped_messages():
    assert str(Stopped(7, True)) == "stopped after step 7 (checkpoint saved)"
    assert str(Stopped()) == "stopped on SIGTERM after the actors' last request"
