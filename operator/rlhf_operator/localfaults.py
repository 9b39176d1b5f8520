"""Fault injection through the local runner: kill a random role process at a random moment, several
times over one run, and measure what the gang restart cost (issue 4). Used by the integration tests
(a handful of trials) and bench/faults.py (many).

A kill happens only once the current gang is whole and has written at least one new metrics line,
so every kill lands in the middle of training, never in the backoff gap between two gangs.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_operator import report
from rlhf_operator.local import LocalRunner


@dataclass
class TrialResult:
    kills: list[str] = field(default_factory=list)  # victim pod per kill
    phase: str = ""
    restarts: int = 0  # status.restarts at the end
    final_step: int = 0
    max_steps: int = 0
    interval: int = 0
    steps_redone: list[int] = field(default_factory=list)  # per resume seen in actor-0's metrics
    gang_restart_s: list[float] = field(default_factory=list)  # kill -> every pod of the next gang started
    resume_s: list[float] = field(default_factory=list)  # kill -> first metrics line of the next gang
    wall_s: float = 0.0
    error: str = ""

    def ok(self) -> bool:
        """Finished every step, one gang restart per kill, no restart redid more than one interval."""
        return (self.phase == "Succeeded" and self.final_step == self.max_steps
                and self.restarts == len(self.kills) and all(r <= self.interval for r in self.steps_redone))


def gang_attempt(runner: LocalRunner, size: int) -> int | None:
    """The restart attempt of the running gang if all `size` processes of one attempt are alive."""
    procs = list(runner.supervisor.processes().values())
    attempts = {p.spec.env.get("RLHF_RESTART_ATTEMPT") for p in procs}
    if len(procs) != size or len(attempts) != 1 or any(p.exit_code is not None for p in procs):
        return None
    return int(attempts.pop() or 0)


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run_with_kills(runner: LocalRunner, kills: int, rng: random.Random, *, max_delay: float = 1.0,
                   timeout: float = 300.0, poll: float = 0.02) -> TrialResult:
    """Run the job to the end in a thread while killing `kills` random role processes."""
    gang_size = sum(r.replicas for r in runner.job.spec.pod_roles())
    actor_metrics = runner.checkpoint_dir / "metrics" / "actor-0.jsonl"
    result = TrialResult(max_steps=runner.job.spec.hyperparameters.max_steps,
                         interval=runner.job.spec.checkpoint.interval_steps)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["status"] = runner.run(timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - reported in the result, not lost in a thread
            outcome["error"] = repr(e)

    t0 = time.monotonic()
    thread = threading.Thread(target=target, name="local-runner", daemon=True)
    thread.start()
    deadline = t0 + timeout
    kill_times: list[float] = []
    try:
        while len(result.kills) < kills and thread.is_alive() and time.monotonic() < deadline:
            attempt = len(result.kills)
            # The gang of this attempt is whole, Running, and has made progress: then a random moment.
            if not _wait(lambda attempt=attempt: (gang_attempt(runner, gang_size) == attempt
                                  and runner.job.status.get("phase") == "Running") or not thread.is_alive(),
                         deadline, poll):
                break
            lines = count_lines(actor_metrics)
            if not _wait(lambda lines=lines: count_lines(actor_metrics) > lines or not thread.is_alive(), deadline, poll):
                break
            time.sleep(rng.uniform(0, max_delay))
            if gang_attempt(runner, gang_size) != attempt or runner.job.status.get("phase") != "Running":
                continue  # finished or failed meanwhile: the loop condition decides
            victim = rng.choice(sorted(runner.supervisor.processes()))
            kill_time = time.monotonic()
            if runner.supervisor.kill(victim):
                result.kills.append(victim)
                kill_times.append(kill_time)
        thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        if thread.is_alive():
            runner.request_stop()
            thread.join(30)
    result.wall_s = time.monotonic() - t0
    status = outcome.get("status") or runner.job.status
    result.error = outcome.get("error", "")
    result.phase = status.get("phase", "")
    result.restarts = int(status.get("restarts", 0) or 0)
    try:
        h = report.history(report.read_jsonl(actor_metrics))
        result.final_step, result.steps_redone = h.last_step, h.steps_redone
    except (OSError, report.ReportError):
        pass
    starts = runner.timeline.times("pod_started")
    gang_started = []
    for k in kill_times:
        after = [s for s in starts if s > k]
        if len(after) >= gang_size:
            result.gang_restart_s.append(after[gang_size - 1] - k)
            gang_started.append((k, after[gang_size - 1]))
    result.resume_s = _resume_latencies(actor_metrics, gang_started)
    return result


def _resume_latencies(metrics: Path, restarts: list[tuple[float, float]]) -> list[float]:
    """Per (kill, next gang started): kill -> the actor's first metrics line written by that gang."""
    try:
        rows = report.read_jsonl(metrics)
    except (OSError, report.ReportError):
        return []
    # Rows carry wall-clock `time`; the timeline is monotonic: convert through one shared offset.
    offset = time.time() - time.monotonic()
    times = sorted(r["time"] for r in rows if isinstance(r.get("time"), int | float))
    out = []
    for killed, started in restarts:
        after = [t for t in times if t > started + offset]
        if after:
            out.append(after[0] - (killed + offset))
    return out


def _wait(predicate: Any, deadline: float, poll: float) -> bool:
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True
