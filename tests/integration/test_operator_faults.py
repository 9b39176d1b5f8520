"""The operator under API faults: between it and the real API server sits tests/controlplane/faultproxy.py,
which fails chosen writes (500, 429 with Retry-After, 409), cuts watch streams and answers re-watches with
410 Gone. The tests act on the cluster directly (as the admin, not through the proxy) and assert the end
state: pods, status, events counted exactly, series observed once, requests counted at the proxy."""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import datetime

import kubernetes
import pytest
from operator_kube import NS, apply, events, example, job, metric, pods, set_all, wait_phase, wait_pods
from rlhf_operator import constants, planner
from rlhf_operator.kube.executor import KubeApi

from tests.controlplane import faultproxy, kube

RESYNC_SECONDS = 3.0
WRITES = ("POST", "PATCH", "PUT", "DELETE")


@pytest.fixture(scope="module")
def proxy(cluster):
    p = faultproxy.start(cluster, seed=19)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def operator(cluster, rlhf_release, proxy, tmp_path_factory, request):
    """The chart's operator (its args and RBAC) talking to the API server through the proxy, resyncing
    every RESYNC_SECONDS."""
    workdir = tmp_path_factory.mktemp("faulty-operator")
    kubeconfig = proxy.kubeconfig(rlhf_release.kubeconfig, workdir / "via-proxy.kubeconfig")
    log = workdir / "operator.log"
    op = kube.start_operator(cluster, log, *rlhf_release.args, f"--resync-seconds={RESYNC_SECONDS}",
                             kubeconfig=kubeconfig)
    failed_before = request.session.testsfailed
    yield op
    listed = kube.get_json(cluster, "rlhfjobs", "-n", NS) or {"items": []}
    mine = [j["metadata"]["name"] for j in listed["items"] if j["metadata"]["name"].startswith("fault-")]
    if mine:  # the next modules' operators need not reconcile them
        kube.kubectl(cluster, "delete", "rlhfjob", "-n", NS, "--wait=false", "--ignore-not-found", *mine)
    op.stop()
    if request.session.testsfailed > failed_before:
        print(f"\n--- operator log tail ({log}) ---\n{op.log_tail(8000)}")


def reasons(cp, name: str) -> Counter:
    """Events recorded on the job, by reason, each counted as often as it was recorded."""
    counts: Counter = Counter()
    for event in events(cp, name):
        counts[event["reason"]] += int(event.get("count") or 1)
    return counts


# Warnings posted once per failure streak, as one Event whose count grows (post_recurring_event).
RECURRING = frozenset({"StatusWriteFailed", "RequestRefused"})


def assert_each_event_once(cp, name: str) -> None:
    """No event of the job was recorded twice (the same reason and message twice, or a count above 1);
    a recurring warning is one Event whatever its count."""
    recorded = [(e["reason"], e["message"], int(e.get("count") or 1)) for e in events(cp, name)]
    assert all(count == 1 for reason, _, count in recorded if reason not in RECURRING), recorded
    assert len({(r, m) for r, m, _ in recorded}) == len(recorded), recorded


def histogram_count(op, name: str) -> float:
    return metric(op, f"{name}_count") or 0.0


def status_path(name: str) -> str:
    return rf"/namespaces/{NS}/rlhfjobs/{name}/status$"


def start_running(cp, name: str, **spec) -> dict:
    apply(cp, example("ppo-tiny.yaml", name, **spec))
    gang = wait_pods(cp, name, 3, timeout=40)
    set_all(cp, gang, "Running")
    running = wait_phase(cp, name, "Running", timeout=40)
    # Events follow the status write that records their transition: the Running event comes just after.
    kube.wait_for(lambda: reasons(cp, name)["Running"], timeout=20, what=f"the Running event of {name}")
    return running


def test_events_and_time_to_running_once_under_repeated_conflicts(cluster, operator, proxy):
    name = "fault-conflicts"
    observed = histogram_count(operator, "rlhf_operator_time_to_running_seconds")
    created = metric(operator, "rlhf_operator_jobs_created_total") or 0.0
    conflicts = proxy.fail("PATCH", status_path(name), status=409, times=6)
    start_running(cluster, name)
    assert conflicts.injected == 6  # every retry of the first transitions met a conflict first
    counts = reasons(cluster, name)
    print(f"events under {conflicts.injected} conflicting status writes: {dict(counts)}")
    assert counts["GangCreated"] == 1 and counts["Running"] == 1, counts
    assert_each_event_once(cluster, name)
    kube.wait_for(lambda: histogram_count(operator, "rlhf_operator_time_to_running_seconds") == observed + 1,
                  what="time_to_running observed once")
    assert metric(operator, "rlhf_operator_jobs_created_total") == created + 1
    time.sleep(RESYNC_SECONDS + 1)  # a resync pass later, nothing is counted again
    assert histogram_count(operator, "rlhf_operator_time_to_running_seconds") == observed + 1
    assert reasons(cluster, name) == counts


def test_writes_failing_with_500s_still_give_one_gang_and_one_event_per_transition(cluster, operator, proxy):
    name = "fault-storm"
    observed = histogram_count(operator, "rlhf_operator_time_to_running_seconds")
    storm = proxy.fail(WRITES, rf"/namespaces/{NS}/(pods|services|configmaps|persistentvolumeclaims|events|"
                               rf"podgroups|rlhfjobs)\b.*", status=500, share=0.3)
    try:
        start_running(cluster, name)
        time.sleep(RESYNC_SECONDS + 1)
    finally:
        proxy.clear_faults()
    assert storm.injected > 0
    assert sorted(pods(cluster, name)) == [f"{name}-actor-0", f"{name}-critic-0", f"{name}-reference-0"]
    counts = reasons(cluster, name)
    assert counts["GangCreated"] == 1 and counts["Running"] == 1, counts
    assert_each_event_once(cluster, name)
    assert histogram_count(operator, "rlhf_operator_time_to_running_seconds") == observed + 1


async def test_a_recurring_warning_is_one_event_whose_count_grows(cluster, rlhf_release):
    """As the chart's ServiceAccount (its RBAC): three streaks of the same failure give one Event, count 3,
    lastTimestamp moving on; another message is another Event."""
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(rlhf_release.kubeconfig), client_configuration=config)
    api = KubeApi(config=config)
    name = "fault-recurring"
    body = {"apiVersion": constants.API_VERSION, "kind": constants.KIND,
            "metadata": {"name": name, "namespace": NS, "uid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001"}}
    try:
        for _ in range(3):
            assert await api.post_recurring_event(body, "Warning", "StatusWriteFailed", "PATCH: 500 injected")
        assert await api.post_recurring_event(body, "Warning", "StatusWriteFailed", "PATCH: 503 injected")
    finally:
        await api.close()
    recorded = sorted((e["message"], int(e["count"]), e["firstTimestamp"] <= e["lastTimestamp"])
                      for e in events(cluster, name))
    assert recorded == [("PATCH: 500 injected", 3, True), ("PATCH: 503 injected", 1, True)]


def test_retry_after_is_honoured(cluster, operator, proxy):
    name = "fault-throttled"
    proxy.fail("PATCH", status_path(name), status=429, times=1, retry_after=2)
    start_running(cluster, name)
    patches = proxy.requests("PATCH", status_path(name))
    throttled = next(i for i, r in enumerate(patches) if r.injected)
    gap = patches[throttled + 1].at - patches[throttled].at
    print(f"status write retried {gap:.2f}s after a 429 with Retry-After: 2")
    assert gap >= 2.0
    assert reasons(cluster, name)["GangCreated"] == 1


def test_a_pod_deleted_while_the_watches_were_away_is_noticed_and_the_gang_restarts(cluster, operator, proxy):
    name = "fault-missed-pod"
    start_running(cluster, name, failurePolicy={"maxRestarts": 2, "backoffSeconds": 1})
    before = reasons(cluster, name)
    proxy.pause_watches()
    try:
        kube.kubectl(cluster, "delete", "pod", f"{name}-critic-0", "-n", NS, "--grace-period=0", "--force")
        kube.wait_for(lambda: f"{name}-critic-0" not in pods(cluster, name), what="the pod deleted")
        deleted = datetime.now()
        time.sleep(1.0)
    finally:
        proxy.resume_watches(gone=True)  # the re-watches get 410 Gone: kopf lists again, no DELETED comes
    gone = [r for r in proxy.requests("GET") if r.status == 410]
    assert gone, "no re-watch was answered 410 Gone"
    # The vanished pod is seen at the periodic resync (while the watches are still away, if it falls then)
    # or at the one that follows kopf's re-list, whichever comes first ...
    line = kube.wait_for(lambda: next((ln for ln in operator.log_tail(200_000).splitlines()
                                       if f"job {NS}/{name}: 1 children deleted while a watch was away" in ln), None),
                         timeout=RESYNC_SECONDS * 3 + 10, what="the missed deletion noticed")
    noticed = (datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") - deleted).total_seconds()
    # ... and the gang restarts once the planner's grace for a missing pod is over.
    second = wait_pods(cluster, name, 3, attempt=1, timeout=planner.MISSING_POD_GRACE_SECONDS + RESYNC_SECONDS * 3 + 10)
    print(f"a pod deleted while the watches were away: noticed {noticed:.1f}s after its deletion "
          f"(resync every {RESYNC_SECONDS:g}s), new gang {(datetime.now() - deleted).total_seconds():.1f}s after it")
    set_all(cluster, second, "Running")
    status = wait_phase(cluster, name, "Running", timeout=30)["status"]
    assert status["disruptions"] == 1 and status["restarts"] == 0
    after = reasons(cluster, name)
    assert after["GangDisrupted"] - before["GangDisrupted"] == 1
    assert after["GangCreated"] - before["GangCreated"] == 1
    assert after["Running"] - before["Running"] == 1


def test_a_job_deleted_while_the_watches_were_away_is_forgotten(cluster, operator, proxy):
    name = "fault-missed-job"
    start_running(cluster, name)
    assert metric(operator, "rlhf_operator_job_phase", namespace=NS, job=name, phase="Running") == 1
    proxy.pause_watches()
    try:
        kube.kubectl(cluster, "delete", "rlhfjob", name, "-n", NS, "--wait=false")
        kube.wait_for(lambda: not pods(cluster, name) and job(cluster, name) is None, timeout=30,
                      what="the job and its pods collected")
        deleted = time.monotonic()
    finally:
        proxy.resume_watches(gone=True)
    path = re.compile(rf"/namespaces/{NS}/[a-z]+/{name}(-[a-z0-9-]+)?(/status)?$")

    def writes_for_the_job():  # updates and deletes name it in the path, creates (events too) in the body
        return [r for r in proxy.requests() if r.method in WRITES and r.at > deleted
                and (path.search(r.path) or r.name.startswith(name))]

    kube.wait_for(lambda: metric(operator, "rlhf_operator_job_phase", namespace=NS, job=name, phase="Running")
                  is None, timeout=RESYNC_SECONDS * 3 + 10, what="the job's series dropped (the job forgotten)")
    forgotten = time.monotonic()
    writes_then = writes_for_the_job()
    time.sleep(RESYNC_SECONDS * 2 + 1)  # two resyncs later, nothing more is written
    writes_now = writes_for_the_job()
    print(f"a job deleted while the watches were away: forgotten {forgotten - deleted:.1f}s after its deletion; "
          f"{len(writes_then)} writes for it meanwhile")
    # At most one pass ran for it before the resync forgot it (a timer's): its status write met 404.
    assert len([r for r in writes_then if r.path.endswith("/status")]) <= 1
    assert writes_now == writes_then
    assert not pods(cluster, name)
    assert kube.get_json(cluster, "configmap", f"{name}-config", "-n", NS) is None


def test_without_faults_each_restart_transition_is_counted_once(cluster, operator, proxy):
    names = [f"fault-none-{i}" for i in range(3)]
    to_running = histogram_count(operator, "rlhf_operator_time_to_running_seconds")
    latency = histogram_count(operator, "rlhf_operator_restart_latency_seconds")
    for name in names:
        apply(cluster, example("ppo-tiny.yaml", name, failurePolicy={"maxRestarts": 2, "backoffSeconds": 1}))
    for name in names:
        set_all(cluster, wait_pods(cluster, name, 3, timeout=40), "Running")
    for name in names:
        wait_phase(cluster, name, "Running", timeout=40)
        kube.kubectl(cluster, "delete", "pod", f"{name}-critic-0", "-n", NS, "--wait=false")
    for name in names:
        set_all(cluster, wait_pods(cluster, name, 3, attempt=1, timeout=40), "Running")
    for name in names:
        wait_phase(cluster, name, "Running", timeout=40)
    time.sleep(RESYNC_SECONDS + 1)  # a resync later
    counts = {name: reasons(cluster, name) for name in names}
    observed = (histogram_count(operator, "rlhf_operator_time_to_running_seconds") - to_running,
                histogram_count(operator, "rlhf_operator_restart_latency_seconds") - latency)
    print(f"{len(names)} jobs, one restart each: Running events {[c['Running'] for c in counts.values()]}, "
          f"time_to_running / restart_latency observed {observed}")
    assert [c["Running"] for c in counts.values()] == [2] * len(names)
    assert [c["GangCreated"] for c in counts.values()] == [2] * len(names)
    assert observed == (len(names), len(names))
    for name in names:  # (the same message may come again for the second gang: a transition of its own)
        assert all(int(e.get("count") or 1) == 1 for e in events(cluster, name))
