"""Operator metrics: counters derived from status transitions, per-job series removed with the job."""

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rlhf_operator.metrics import METRIC_NAMES, OperatorMetrics, Transition, status_transition

CREATED = "2026-01-01T00:00:00Z"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def failed(reason):
    return {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": reason}]}


@pytest.mark.parametrize(
    ("old", "new", "now_s", "expected"),
    [
        pytest.param(None, {"phase": "Pending"}, 1, Transition(created=True), id="first-phase-is-created"),
        pytest.param({"phase": "Pending"}, {"phase": "Creating"}, 1, Transition(), id="no-counter-moves"),
        pytest.param({"phase": "Creating"}, {"phase": "Running", "restarts": 0}, 42,
                     Transition(time_to_running=42.0), id="first-gang-running"),
        pytest.param({"phase": "Running"}, {"phase": "Running"}, 50, Transition(), id="still-running-counts-nothing"),
        pytest.param({"phase": "Running", "restarts": 0},
                     {"phase": "Restarting", "restarts": 1, "lastRestartTime": "2026-01-01T00:01:00Z"}, 60,
                     Transition(restarts=1), id="restart-decided"),
        pytest.param({"phase": "Restarting", "restarts": 1, "lastRestartTime": "2026-01-01T00:01:00Z"},
                     {"phase": "Running", "restarts": 1, "lastRestartTime": "2026-01-01T00:01:00Z"}, 75,
                     Transition(restart_latency=15.0), id="restarted-gang-running"),
        pytest.param({"phase": "Running", "restarts": 0, "attempt": 0},
                     {"phase": "Restarting", "restarts": 0, "disruptions": 1, "attempt": 1,
                      "lastRestartTime": "2026-01-01T00:01:00Z"}, 60,
                     Transition(disruptions=1), id="disruption-is-no-restart"),
        pytest.param({"phase": "Creating", "restarts": 0, "disruptions": 1, "attempt": 1,
                      "lastRestartTime": "2026-01-01T00:01:00Z"},
                     {"phase": "Running", "restarts": 0, "disruptions": 1, "attempt": 1,
                      "lastRestartTime": "2026-01-01T00:01:00Z"}, 80,
                     Transition(restart_latency=20.0), id="gang-after-a-disruption-running-is-a-restart-latency"),
        pytest.param({"phase": "Running"}, {"phase": "Succeeded"}, 90, Transition(succeeded=True), id="succeeded"),
        pytest.param({"phase": "Succeeded"}, {"phase": "Succeeded"}, 95, Transition(), id="succeeded-once"),
        pytest.param({"phase": "Running"}, failed("PermanentError"), 90, Transition(failed_reason="PermanentError"),
                     id="failed-with-reason"),
        pytest.param(None, failed("InvalidSpec"), 1, Transition(created=True, failed_reason="InvalidSpec"),
                     id="invalid-spec-is-created-and-failed"),
        pytest.param({"phase": "Running"}, {"phase": "Failed"}, 90, Transition(failed_reason="Unknown"),
                     id="failed-without-condition"),
        pytest.param({"phase": "Failed", **failed("X")}, failed("X"), 99, Transition(), id="failed-once"),
        pytest.param({"phase": "Suspended", "restarts": 0}, {"phase": "Running", "restarts": 0}, 99, Transition(),
                     id="resume-is-not-time-to-running"),
    ],
)
def test_status_transition(old, new, now_s, expected):
    assert status_transition(old, new, CREATED, T0 + timedelta(seconds=now_s)) == expected


def scrape(metrics: OperatorMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed from the real exposition text."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_exposes_exactly_the_spec_names():
    metrics = OperatorMetrics()
    metrics.record_status("ns", "a", None, {"phase": "Running", "progress": {"step": 3}}, CREATED, T0)
    metrics.record_status("ns", "a", {"phase": "Running"}, failed("ReachedMaxRestarts"), CREATED, T0)
    metrics.reconcile.observe(0.01)
    families = {fam.name for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    # prometheus_client names counter families without the _total suffix the samples carry
    expected = {n.removesuffix("_total") for n in METRIC_NAMES}
    assert families == expected


def test_record_status_counts_and_sets_job_series():
    m = OperatorMetrics()
    m.record_status("ns", "a", None, {"phase": "Pending"}, CREATED, T0)
    m.record_status("ns", "b", None, {"phase": "Pending"}, CREATED, T0)
    m.record_status("ns", "a", {"phase": "Pending"}, {"phase": "Running", "restarts": 0, "progress": {"step": 4}},
                    CREATED, T0 + timedelta(seconds=30))
    m.record_status("ns", "a", {"phase": "Running", "restarts": 0},
                    {"phase": "Restarting", "restarts": 1, "lastRestartTime": "2026-01-01T00:01:00Z"},
                    CREATED, T0 + timedelta(seconds=60))
    s = scrape(m)
    assert s[("rlhf_operator_jobs_created_total", ())] == 2
    assert s[("rlhf_operator_jobs_restarts_total", ())] == 1
    assert s[("rlhf_operator_jobs", (("phase", "Pending"),))] == 1
    assert s[("rlhf_operator_jobs", (("phase", "Restarting"),))] == 1
    assert s[("rlhf_operator_jobs", (("phase", "Running"),))] == 0
    assert s[("rlhf_operator_job_phase", (("job", "a"), ("namespace", "ns"), ("phase", "Restarting")))] == 1
    assert ("rlhf_operator_job_phase", (("job", "a"), ("namespace", "ns"), ("phase", "Running"))) not in s
    assert s[("rlhf_operator_job_restarts", (("job", "a"), ("namespace", "ns")))] == 1
    assert s[("rlhf_operator_job_step", (("job", "a"), ("namespace", "ns")))] == 4
    assert s[("rlhf_operator_time_to_running_seconds_count", ())] == 1
    assert s[("rlhf_operator_time_to_running_seconds_sum", ())] == 30


def test_forget_job_removes_its_series_and_phase_count():
    m = OperatorMetrics()
    m.record_status("ns", "a", None, {"phase": "Running", "restarts": 2, "progress": {"step": 9}}, CREATED, T0)
    m.record_status("ns", "b", None, {"phase": "Running"}, CREATED, T0)
    m.forget_job("ns", "a")
    s = scrape(m)
    assert not [k for k in s if dict(k[1]).get("job") == "a"]
    assert s[("rlhf_operator_jobs", (("phase", "Running"),))] == 1
    assert s[("rlhf_operator_jobs_created_total", ())] == 2  # totals are history: they stay
    m.forget_job("ns", "never-seen")  # unknown jobs are fine


def test_two_operators_have_separate_registries():
    a, b = OperatorMetrics(), OperatorMetrics()
    a.record_status("ns", "x", None, {"phase": "Pending"}, CREATED, T0)
    assert scrape(b)[("rlhf_operator_jobs_created_total", ())] == 0
