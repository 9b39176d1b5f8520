"""The kube shell under API faults, without a cluster: the retry delay as a property, Retry-After parsing,
children a fresh LIST lacks, and a controller over a scripted API (status writes that fail or say the job is
gone, events posted once per transition, stale watch events, resyncs). The same scenarios against the real
API server through a fault proxy are in tests/integration/test_operator_faults.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rlhf_contract import wire
from rlhf_operator import constants
from rlhf_operator.builders import BuildSettings
from rlhf_operator.kube.executor import ApiError, event_name, retry_after_seconds
from rlhf_operator.kube.observe import vanished
from rlhf_operator.kube.reconciler import Controller
from rlhf_operator.kube.workqueue import ERROR_BACKOFF_BASE, ERROR_BACKOFF_MAX, RETRY_AFTER_MAX, retry_delay
from rlhf_operator.metrics import OperatorMetrics

# -- the retry delay -----------------------------------------------------------------------------------

failures = st.integers(min_value=1, max_value=10_000)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(failures, st.sampled_from([0, 409, 500, 502, 504]), draws)
def test_full_jitter_stays_under_a_doubling_envelope_capped_at_a_minute(n, status, draw):
    delay = retry_delay(n, status, None, draw)
    envelope = ERROR_BACKOFF_MAX if n > 20 else min(ERROR_BACKOFF_MAX, ERROR_BACKOFF_BASE * 2 ** (n - 1))
    assert 0.0 <= delay < envelope
    assert delay == pytest.approx(draw * envelope)


@given(failures, st.sampled_from([429, 503]), st.floats(min_value=0, max_value=10_000), draws)
def test_a_throttled_answer_waits_at_least_its_retry_after_and_is_bounded(n, status, retry_after, draw):
    delay = retry_delay(n, status, retry_after, draw)
    assert delay >= min(retry_after, RETRY_AFTER_MAX)
    assert delay <= RETRY_AFTER_MAX + ERROR_BACKOFF_BASE


@given(failures, st.floats(min_value=0, max_value=100), draws)
def test_retry_after_on_other_statuses_is_ignored(n, retry_after, draw):
    assert retry_delay(n, 500, retry_after, draw) == retry_delay(n, 500, None, draw)


@given(draws)
def test_the_envelope_grows_with_failures(draw):
    assert [retry_delay(n, 500, None, draw) for n in (1, 2, 3)] == pytest.approx([draw * 0.5, draw * 1.0, draw * 2.0])


@pytest.mark.parametrize(("args", "message"), [
    ((0, 500, None, 0.5), "failures must be >= 1"),
    ((1, 500, None, 1.0), r"draw must be in \[0, 1\)"),
    ((1, 500, None, -0.1), r"draw must be in \[0, 1\)"),
])
def test_retry_delay_refuses_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        retry_delay(*args)


NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(("header", "seconds"), [
    ("2", 2.0), (" 120 ", 120.0), ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0), ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0),
    (None, None), ("", None), ("soon", None), ("-3", None), ("1.5", None),
], ids=["seconds", "padded", "http-date", "date-past", "absent", "empty", "word", "negative", "fraction"])
def test_retry_after_header(header, seconds):
    assert retry_after_seconds(header, NOW) == seconds


def test_an_api_error_carries_the_retry_after_it_was_given():
    err = ApiError("PATCH", "/x", 429, '{"kind":"Status","message":"slow down"}', retry_after=3.0)
    assert (err.status, err.retry_after, err.api_message) == (429, 3.0, "slow down")


# -- children a fresh LIST lacks ------------------------------------------------------------------------

def child(kind, uid, api_version="v1"):
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": f"n-{uid}", "uid": uid}}


VOLCANO = ("scheduling.volcano.sh/v1beta1", "PodGroup")
COSCHEDULING = ("scheduling.x-k8s.io/v1alpha1", "PodGroup")
CORE = {("v1", "Pod"), ("v1", "Service")}


@pytest.mark.parametrize(("cached", "listed", "kinds", "gone"), [
    ([child("Pod", "a"), child("Pod", "b")], [child("Pod", "a")], CORE, {"b"}),
    ([child("Pod", "a")], [child("Pod", "a"), child("Pod", "c")], CORE, set()),
    ([child("Pod", "old")], [{**child("Pod", "new"), "metadata": {"name": "n-old", "uid": "new"}}], CORE, {"old"}),
    ([child("ConfigMap", "m")], [], CORE, set()),
    ([child("PodGroup", "g", COSCHEDULING[0])], [], CORE | {VOLCANO}, set()),
    ([child("PodGroup", "g", COSCHEDULING[0])], [], CORE | {COSCHEDULING}, {"g"}),
    ([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}], [], CORE, set()),
], ids=["deleted", "created-after", "same-name-new-uid", "kind-not-listed", "other-podgroup-kind",
        "podgroup-deleted", "no-uid"])
def test_vanished(cached, listed, kinds, gone):
    assert vanished(cached, listed, kinds) == gone


def test_event_names_are_one_per_transition_and_event():
    first = event_name("j", "41", "Normal", "Running", "all 3 pods running")
    assert first == event_name("j", "41", "Normal", "Running", "all 3 pods running")
    assert first.startswith("j.41.")
    assert first != event_name("j", "57", "Normal", "Running", "all 3 pods running")
    assert first != event_name("j", "41", "Normal", "GangCreated", "all 3 pods running")


# -- a controller over a scripted API ---------------------------------------------------------------------

KEY = ("ns", "j")


def job_body(rv="1", status=None):
    return {"apiVersion": constants.API_VERSION, "kind": constants.KIND,
            "metadata": {"name": "j", "namespace": "ns", "uid": "job-uid", "generation": 1, "resourceVersion": rv,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"algorithm": "sft", "image": "t", "model": {"path": "tiny://llama"},
                     "dataset": {"path": "synthetic://instructions"}, "roles": [{"name": "actor"}]},
            "status": status or {}}


def pod_body(uid, phase="Running", attempt=0):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "j-actor-0", "namespace": "ns", "uid": uid, "labels": {
                wire.LABEL_JOB: "j", wire.LABEL_ROLE: "actor", wire.LABEL_ROLE_INDEX: "0",
                wire.LABEL_RESTART_ATTEMPT: str(attempt)}},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}}


SUPPORT = [{"apiVersion": "v1", "kind": k, "metadata": {"name": n, "namespace": "ns", "uid": f"uid-{n}", "labels": {wire.LABEL_JOB: "j"}}}
           for k, n in (("Service", "j"), ("ConfigMap", "j-config"), ("PersistentVolumeClaim", "j-checkpoints"))]


class ScriptedApi:
    """The API as a pass sees it: status writes answered from a script ("ok", "gone" or an HTTP status),
    events recorded by name (a name posted twice is recorded once, as the API server's 409 makes it)."""

    def __init__(self, status_script=(), event_script=()):
        self.status_script, self.event_script = list(status_script), list(event_script)
        self.status_patches, self.created, self.deleted = [], [], []
        self.events: dict[str, str] = {}  # name -> reason
        self.event_posts = 0
        self.rv, self.status = 100, {}
        self.jobs: list[dict] | None = None
        self.listed: dict[str, list[dict]] = {}

    async def create(self, obj):
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True

    async def delete(self, api_version, kind, namespace, name):
        self.deleted.append((kind, name))
        return True

    async def patch_job_status(self, namespace, name, patch):
        self.status_patches.append(patch)
        answer = self.status_script.pop(0) if self.status_script else "ok"
        if answer == "gone":
            return None
        if answer != "ok":
            raise ApiError("PATCH", f"/rlhfjobs/{name}/status", answer, "{}",
                           retry_after=2.0 if answer == 429 else None)
        self.rv += 1
        self.status = {k: v for k, v in {**self.status, **patch}.items() if v is not None}
        return {"metadata": {"name": name, "resourceVersion": str(self.rv)}, "status": dict(self.status)}

    async def post_event(self, job, type_, reason, message, name=""):
        self.event_posts += 1
        if self.event_script and not self.event_script.pop(0):
            return False
        if name:
            self.events.setdefault(name, reason)
        else:
            self.events[f"generated-{len(self.events)}"] = reason
        return True

    async def post_recurring_event(self, job, type_, reason, message):
        return await self.post_event(job, type_, reason, message)

    async def list_objects(self, api_version, kind, namespace, label_selector=""):
        if kind == constants.KIND:
            return self.jobs
        return self.listed.get(kind, [])

    def reasons(self):
        return sorted(self.events.values())


def make_controller(api, pods=None):
    pods = {KEY: list(pods)} if pods else {}
    return Controller(api=api, settings=BuildSettings(), metrics=OperatorMetrics(), pods=pods,
                      children={KEY: list(SUPPORT)})


def time_to_running_count(c):
    return c.metrics.registry.get_sample_value("rlhf_operator_time_to_running_seconds_count") or 0.0


async def test_conflicting_status_writes_post_the_events_once_after_the_write_that_records_them():
    api = ScriptedApi(status_script=[409, 409, 409, "ok"])
    c = make_controller(api)
    c.job_changed(KEY, job_body(), "ADDED")
    for _ in range(3):
        with pytest.raises(ApiError):
            await c.reconcile(KEY)
        assert [r for r in api.reasons() if r != "StatusWriteFailed"] == []  # nothing told before the write
    await c.reconcile(KEY)
    assert api.reasons().count("GangCreated") == 1
    assert [k for k, _ in api.created].count("Pod") == 1  # the gang was created once, expectations held
    created = c.metrics.registry.get_sample_value("rlhf_operator_jobs_created_total")
    assert created == 1.0


async def test_an_event_whose_post_failed_is_posted_again_under_the_same_name():
    api = ScriptedApi(event_script=[False, True])
    c = make_controller(api)
    c.job_changed(KEY, job_body(), "ADDED")
    delay = await c.reconcile(KEY)
    assert api.events == {} and len(c.record(KEY).pending) == 1 and delay is not None
    [pending] = c.record(KEY).pending
    await c.reconcile(KEY)
    assert api.events == {pending.name: "GangCreated"} and c.record(KEY).pending == []


async def test_a_stale_modified_event_does_not_make_the_next_pass_plan_from_an_older_status():
    api = ScriptedApi()
    c = make_controller(api, pods=[pod_body("p1")])
    c.job_changed(KEY, job_body(rv="1"), "ADDED")
    await c.reconcile(KEY)  # the gang is created: first write
    first = (c.record(KEY).written[0], dict(api.status))
    await c.reconcile(KEY)  # its pod runs: Running, second write
    assert api.status["phase"] == "Running" and time_to_running_count(c) == 1
    written_rv = c.record(KEY).written[0]
    # The watch now delivers the MODIFIED event of our first write, older than the second:
    c.job_changed(KEY, job_body(rv=first[0], status=first[1]), "MODIFIED")
    await c.reconcile(KEY)
    assert time_to_running_count(c) == 1 and api.reasons().count("Running") == 1
    assert len(api.status_patches) == 2  # nothing to write: the pass planned from the status written
    # Once the watch delivers our write, the cache is trusted again.
    c.job_changed(KEY, job_body(rv=written_rv, status=dict(api.status)), "MODIFIED")
    assert c.record(KEY).written is None


def test_a_listing_event_drops_the_written_status():
    c = make_controller(ScriptedApi())
    c.job_changed(KEY, job_body(rv="1"), "ADDED")
    c.record(KEY).written = ("9", {"phase": "Running"})
    c.job_changed(KEY, job_body(rv="12", status={"phase": "Succeeded"}), None)
    assert c.record(KEY).written is None


async def test_a_status_write_answered_404_forgets_the_job_and_its_creates_stop():
    api = ScriptedApi(status_script=["gone"])
    c = make_controller(api)
    c.job_changed(KEY, job_body(), "ADDED")
    assert await c.reconcile(KEY) is None
    assert KEY not in c.records
    created = list(api.created)
    c.child_changed(KEY, pod_body("p1"), "DELETED")  # a late event of a child
    assert await c.reconcile(KEY) is None
    assert api.created == created and len(api.status_patches) == 1


async def test_a_resync_forgets_a_job_the_list_lacks():
    api = ScriptedApi()
    c = make_controller(api)
    c.job_changed(KEY, job_body(), "ADDED")
    api.jobs = []
    await c.resync()
    assert KEY not in c.records
    assert c.metrics.registry.get_sample_value("rlhf_operator_job_phase",
                                               {"namespace": "ns", "job": "j", "phase": "Running"}) is None


async def test_a_resync_sees_a_pod_deleted_while_the_watch_was_away_and_the_gang_restarts():
    stale = pod_body("p1")
    api = ScriptedApi()
    c = make_controller(api, pods=[stale])
    c.job_changed(KEY, job_body(), "ADDED")
    await c.reconcile(KEY)
    await c.reconcile(KEY)
    assert api.status["phase"] == "Running"
    # The watch delivers our write; the gang has run for longer than the planner's grace for missing pods.
    status = dict(api.status, conditions=[dict(cond, lastTransitionTime="2026-01-01T00:00:00Z")
                                          for cond in api.status["conditions"]])
    c.job_changed(KEY, job_body(rv=str(api.rv), status=status), "MODIFIED")
    api.jobs = [job_body(rv=str(api.rv))]
    api.listed = {"Pod": [], "Service": SUPPORT[:1], "ConfigMap": SUPPORT[1:2], "PersistentVolumeClaim": SUPPORT[2:]}
    await c.resync()
    assert c.record(KEY).gone == {"p1"}
    assert KEY in c.queue._queued  # the resync enqueued a pass
    await c.reconcile(KEY)
    assert api.status["phase"] == "Restarting" and api.status["disruptions"] == 1
    assert api.reasons().count("GangDisrupted") == 1


async def test_the_worker_waits_what_retry_after_asks():
    api = ScriptedApi(status_script=[429])
    c = make_controller(api)
    c.job_changed(KEY, job_body(), "ADDED")
    waits = []
    c.queue.add_after = lambda key, delay: waits.append(delay)
    c.start()
    try:
        import asyncio

        for _ in range(100):
            await asyncio.sleep(0.01)
            if waits:
                break
    finally:
        await c.stop()
    assert waits and 2.0 <= waits[0] < 2.0 + ERROR_BACKOFF_BASE


def test_resync_interval_comes_from_the_command_line():
    from rlhf_operator.cli import build_parser
    from rlhf_operator.kube.config import OperatorConfig

    args = build_parser().parse_args(["operator", "--resync-seconds", "7.5"])
    assert OperatorConfig.from_args(args).resync_seconds == 7.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--resync-seconds", "0"])
    assert timedelta(seconds=OperatorConfig().resync_seconds) == timedelta(minutes=1)


async def test_a_held_key_is_not_processed_before_its_hold_ends_whatever_events_come():
    import asyncio

    from rlhf_operator.kube.workqueue import WorkQueue

    queue = WorkQueue()
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue.hold(KEY, 0.3)
    queue.add(KEY)  # an event meanwhile
    queue.add(KEY)
    assert len(queue) == 0
    key = await asyncio.wait_for(queue.get(), timeout=5)
    assert key == KEY and loop.time() - start >= 0.29
    queue.done(KEY)
    assert len(queue) == 0  # the events collapsed into that one pass
    queue.add(KEY)  # the hold is over: at once
    assert len(queue) == 1


async def test_a_listing_is_followed_by_a_resync_long_before_the_periodic_one():
    import asyncio

    from rlhf_operator.kube import reconciler

    api = ScriptedApi()
    api.jobs = []
    c = make_controller(api)
    c.resync_seconds = 1000.0
    c.job_changed(KEY, job_body(), None)  # kopf lists the jobs (a re-list after 410 Gone looks the same)
    c.start()
    try:
        c.relisted()
        deadline = asyncio.get_running_loop().time() + reconciler.RELIST_SETTLE_SECONDS + 5
        while KEY in c.records and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await c.stop()
    assert KEY not in c.records  # the resync's LIST lacks the job: forgotten


async def test_a_write_whose_watch_event_came_before_its_answer_is_not_trusted_over_later_events():
    api = ScriptedApi()
    c = make_controller(api)
    c.job_changed(KEY, job_body(rv="1"), "ADDED")
    real_patch = api.patch_job_status

    async def patch_seen_first(namespace, name, patch):
        stored = await real_patch(namespace, name, patch)
        c.job_changed(KEY, job_body(rv=stored["metadata"]["resourceVersion"], status=stored["status"]), "MODIFIED")
        return stored

    api.patch_job_status = patch_seen_first
    await c.reconcile(KEY)
    assert c.record(KEY).written is None


@pytest.mark.parametrize(("refs", "other"), [
    ([{"kind": "RLHFJob", "name": "j", "uid": "job-uid"}], False),
    ([{"kind": "RLHFJob", "name": "j", "uid": "old-uid"}], True),
    ([{"kind": "RLHFJob", "name": "sft", "uid": "x"}, {"kind": "RLHFJob", "name": "j", "uid": "job-uid"}], False),
    ([], False),
], ids=["this-job", "earlier-job-same-name", "co-owned-by-a-chained-job", "no-owner"])
def test_children_of_an_earlier_job_of_the_same_name(refs, other):
    from rlhf_operator.kube.observe import of_another_incarnation

    obj = {"metadata": {"name": "j-actor-0", "ownerReferences": refs}}
    assert of_another_incarnation(obj, "j", "job-uid") is other
    assert of_another_incarnation(obj, "j", "") is False  # a job without a uid (not stored yet) keeps all


async def test_a_job_created_again_under_its_name_ignores_the_stale_pods_of_the_earlier_one():
    stale = pod_body("p-old")
    stale["metadata"]["ownerReferences"] = [{"apiVersion": constants.API_VERSION, "kind": "RLHFJob",
                                             "name": "j", "uid": "earlier-uid", "controller": True}]
    api = ScriptedApi()
    c = make_controller(api, pods=[stale])
    c.job_changed(KEY, job_body(), "ADDED")
    await c.reconcile(KEY)
    assert ("Pod", "j-actor-0") in api.created  # its own gang, not the stale pod taken for it
