"""Operator metrics (docs/spec.md "Metric names"), on a registry of their own.

Counters are derived from (old status, new status) of each reconcile pass by `status_transition`,
a pure function, once the write of the new status succeeded and from the status known to be stored
(kube/reconciler.py): the stored status survives an operator restart and failed writes, so nothing is
counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from rlhf_operator.api import PHASES

# No `*_created` timestamp series: the spec names the series the dashboard reads, nothing more.
disable_created_metrics()

METRIC_NAMES = (
    "rlhf_operator_jobs",
    "rlhf_operator_jobs_created_total",
    "rlhf_operator_jobs_succeeded_total",
    "rlhf_operator_jobs_failed_total",
    "rlhf_operator_jobs_restarts_total",
    "rlhf_operator_jobs_disruptions_total",
    "rlhf_operator_reconcile_duration_seconds",
    "rlhf_operator_time_to_running_seconds",
    "rlhf_operator_restart_latency_seconds",
    "rlhf_operator_job_phase",
    "rlhf_operator_job_restarts",
    "rlhf_operator_job_step",
)

# Gang starts take seconds (image pulls, scheduling) to many minutes (a queue waiting for GPUs).
_STARTUP_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def parse_time(value: str | None) -> datetime | None:
    """RFC3339 as Kubernetes writes it ('2026-01-02T03:04:05Z'), or None if absent/unparseable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _failed_reason(status: dict[str, Any]) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return cond.get("reason") or "Unknown"
    return "Unknown"


@dataclass(frozen=True)
class Transition:
    """What one status change means for the counters and histograms."""

    created: bool = False
    succeeded: bool = False
    failed_reason: str = ""  # "" = did not fail in this pass
    restarts: int = 0
    disruptions: int = 0
    time_to_running: float | None = None
    restart_latency: float | None = None


def status_transition(old: dict[str, Any] | None, new: dict[str, Any], created_at: str | None,
                      now: datetime) -> Transition:
    """Compare the job status before and after a pass.

    created: the job got its first phase. time_to_running: the first gang reached Running (seconds
    since the job's creationTimestamp). restart_latency: a restarted gang reached Running again
    (seconds since status.lastRestartTime, the restart decision).
    """
    old = old or {}
    old_phase, new_phase = old.get("phase") or "", new.get("phase") or ""
    restarts = int(new.get("restarts") or 0)
    # Gangs of any cause (failures, disruptions); statuses without `attempt` counted only restarts.
    attempt = int(new.get("attempt", restarts) or 0)
    became_running = new_phase == "Running" and old_phase != "Running"
    to_running = latency = None
    if became_running and attempt == 0 and old_phase in ("", "Pending", "Creating"):
        started = parse_time(created_at)
        to_running = (now - started).total_seconds() if started else None
    if became_running and attempt > 0 and old_phase in ("Restarting", "Pending", "Creating"):
        decided = parse_time(new.get("lastRestartTime"))
        latency = (now - decided).total_seconds() if decided else None
    return Transition(
        created=not old_phase and bool(new_phase),
        succeeded=new_phase == "Succeeded" and old_phase != "Succeeded",
        failed_reason=_failed_reason(new) if new_phase == "Failed" and old_phase != "Failed" else "",
        restarts=max(0, restarts - int(old.get("restarts") or 0)),
        disruptions=max(0, int(new.get("disruptions") or 0) - int(old.get("disruptions") or 0)),
        time_to_running=max(0.0, to_running) if to_running is not None else None,
        restart_latency=max(0.0, latency) if latency is not None else None,
    )


@dataclass
class OperatorMetrics:
    """Every operator series; `registry` is private so tests and several operators never collide."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Gauge("rlhf_operator_jobs", "RLHFJobs by phase", ["phase"], registry=r)
        self.created = Counter("rlhf_operator_jobs_created_total", "RLHFJobs accepted", registry=r)
        self.succeeded = Counter("rlhf_operator_jobs_succeeded_total", "RLHFJobs that succeeded", registry=r)
        self.failed = Counter("rlhf_operator_jobs_failed_total", "RLHFJobs that failed", ["reason"], registry=r)
        self.restarts = Counter("rlhf_operator_jobs_restarts_total", "gang restarts after failures", registry=r)
        self.disruptions = Counter("rlhf_operator_jobs_disruptions_total",
                                   "gang restarts after disruptions (evictions, preemptions, lost nodes)", registry=r)
        self.reconcile = Histogram("rlhf_operator_reconcile_duration_seconds", "one reconcile pass",
                                   buckets=_RECONCILE_BUCKETS, registry=r)
        self.time_to_running = Histogram("rlhf_operator_time_to_running_seconds",
                                         "job creation to all pods running", buckets=_STARTUP_BUCKETS, registry=r)
        self.restart_latency = Histogram("rlhf_operator_restart_latency_seconds",
                                         "gang restart decision to all pods running again",
                                         buckets=_STARTUP_BUCKETS, registry=r)
        self.job_phase = Gauge("rlhf_operator_job_phase", "1 for the job's current phase",
                               ["namespace", "job", "phase"], registry=r)
        self.job_restarts = Gauge("rlhf_operator_job_restarts", "gang restarts of the job",
                                  ["namespace", "job"], registry=r)
        self.job_step = Gauge("rlhf_operator_job_step", "training step read from the actor rank 0",
                              ["namespace", "job"], registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics in a background thread; returns the server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def record_status(self, namespace: str, name: str, old: dict[str, Any] | None, new: dict[str, Any],
                      created_at: str | None, now: datetime) -> Transition:
        """Count the transition old -> new and set the job's own series."""
        change = status_transition(old, new, created_at, now)
        if change.created:
            self.created.inc()
        if change.succeeded:
            self.succeeded.inc()
        if change.failed_reason:
            self.failed.labels(reason=change.failed_reason).inc()
        if change.restarts:
            self.restarts.inc(change.restarts)
        if change.disruptions:
            self.disruptions.inc(change.disruptions)
        if change.time_to_running is not None:
            self.time_to_running.observe(change.time_to_running)
        if change.restart_latency is not None:
            self.restart_latency.observe(change.restart_latency)
        self.set_job(namespace, name, new)
        return change

    def set_job(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Per-job series and the by-phase gauge from the job's (stored or new) status."""
        key = (namespace, name)
        phase = status.get("phase") or ""
        previous = self._phases.get(key)
        if previous != phase:
            if previous:
                self.job_phase.remove(namespace, name, previous)
            if phase:
                self.job_phase.labels(namespace=namespace, job=name, phase=phase).set(1)
                self._phases[key] = phase
            else:
                self._phases.pop(key, None)
            self._count_phases()
        self.job_restarts.labels(namespace=namespace, job=name).set(int(status.get("restarts") or 0))
        step = (status.get("progress") or {}).get("step")
        if step is not None:
            self.job_step.labels(namespace=namespace, job=name).set(step)

    def forget_job(self, namespace: str, name: str) -> None:
        """The job is gone: drop its per-job series and its place in the by-phase gauge."""
        phase = self._phases.pop((namespace, name), None)
        if phase:
            self.job_phase.remove(namespace, name, phase)
        for gauge in (self.job_restarts, self.job_step):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        self._count_phases()

    def _count_phases(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase=phase).set(count)
