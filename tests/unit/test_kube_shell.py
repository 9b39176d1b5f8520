"""Pure parts of the kube shell: paths, patches, events, child ownership, the work queue."""

import asyncio
from datetime import UTC, datetime

import pytest
from rlhf_contract import wire
from rlhf_operator import constants
from rlhf_operator.kube.executor import event_body, resource_path, status_merge_patch
from rlhf_operator.kube.observe import child_ref, owning_job, progress_url
from rlhf_operator.kube.workqueue import WorkQueue, error_backoff


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("v1", "Pod", "ns"), "/api/v1/namespaces/ns/pods"),
        (("v1", "Pod", "ns", "a-actor-0"), "/api/v1/namespaces/ns/pods/a-actor-0"),
        (("v1", "PersistentVolumeClaim", "ns", "c"), "/api/v1/namespaces/ns/persistentvolumeclaims/c"),
        (("scheduling.volcano.sh/v1beta1", "PodGroup", "ns", "a"),
         "/apis/scheduling.volcano.sh/v1beta1/namespaces/ns/podgroups/a"),
        (("scheduling.x-k8s.io/v1alpha1", "PodGroup", "ns"), "/apis/scheduling.x-k8s.io/v1alpha1/namespaces/ns/podgroups"),
        ((constants.API_VERSION, constants.KIND, "ns", "a", "status"), "/apis/rlhf.dev/v1alpha1/namespaces/ns/rlhfjobs/a/status"),
    ],
)
def test_resource_path(args, path):
    assert resource_path(*args) == path


def test_resource_path_names_an_unknown_kind():
    with pytest.raises(ValueError, match="Deployment of apps/v1"):
        resource_path("apps/v1", "Deployment", "ns")


def test_status_merge_patch_sends_changes_and_nulls_removed_keys():
    old = {"phase": "Running", "restarts": 0, "lastRestartTime": "t", "roles": {"actor": {"running": 1}}}
    new = {"phase": "Running", "restarts": 1, "roles": {"actor": {"running": 0}}}
    assert status_merge_patch(old, new) == {"restarts": 1, "roles": {"actor": {"running": 0}}, "lastRestartTime": None}
    assert status_merge_patch(new, new) == {}


def test_event_body_points_at_the_job():
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u1", "resourceVersion": "7"}}
    event = event_body(job, "Warning", "InvalidSpec", "spec.roles: bad", datetime(2026, 1, 1, tzinfo=UTC))
    assert event["involvedObject"] == {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "name": "j",
                                       "namespace": "ns", "uid": "u1", "resourceVersion": "7"}
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "InvalidSpec", "spec.roles: bad")
    assert event["metadata"] == {"generateName": "j.", "namespace": "ns"}
    assert event["lastTimestamp"] == "2026-01-01T00:00:00Z"


def test_owning_job_by_label_then_owner_reference():
    labelled = {"metadata": {"namespace": "ns", "labels": {wire.LABEL_JOB: "a"}}}
    owned = {"metadata": {"namespace": "ns", "ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x"},
        {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "name": "b"}]}}
    stranger = {"metadata": {"namespace": "ns", "labels": {"app": "x"}}}
    assert owning_job(labelled) == ("ns", "a")
    assert owning_job(owned) == ("ns", "b")
    assert owning_job(stranger) is None
    assert child_ref({"kind": "Service", "metadata": {"name": "a"}}) == ("Service", "a")


def pod(role, index, phase, ip="10.0.0.5", deleting=False):
    meta = {"name": f"j-{role}-{index}", "labels": {wire.LABEL_ROLE: role, wire.LABEL_ROLE_INDEX: str(index)}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "podIP": ip}}


@pytest.mark.parametrize(
    ("pods", "url"),
    [
        ([pod("critic", 0, "Running"), pod("actor", 0, "Running")], "http://10.0.0.5:9400/metrics"),
        ([pod("actor", 1, "Running"), pod("actor", 0, "Pending")], None),
        ([pod("actor", 0, "Running", ip="")], None),
        ([pod("actor", 0, "Running", deleting=True)], None),
        ([pod("actor", 0, "Running", ip="fd00::1")], "http://[fd00::1]:9400/metrics"),
    ],
    ids=["actor-0-running", "actor-0-pending", "no-ip-yet", "terminating", "ipv6"],
)
def test_progress_url(pods, url):
    assert progress_url(pods, 9400) == url


def test_error_backoff_doubles_and_caps():
    assert [error_backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert error_backoff(50) == 60.0


async def test_work_queue_coalesces_and_serialises_a_key():
    q = WorkQueue()
    q.add(("ns", "a"))
    q.add(("ns", "a"))
    q.add(("ns", "b"))
    assert await q.get() == ("ns", "a")
    q.add(("ns", "a"))  # arrives while "a" is being processed: remembered, not queued twice
    assert await q.get() == ("ns", "b")
    assert len(q) == 2
    q.done(("ns", "b"))
    q.done(("ns", "a"))  # the remembered event makes one more pass
    assert await asyncio.wait_for(q.get(), 1) == ("ns", "a")
    q.done(("ns", "a"))
    assert len(q) == 0


async def test_work_queue_add_after_keeps_the_earliest_wake_up():
    q = WorkQueue()
    q.add_after(("ns", "a"), 30)
    q.add_after(("ns", "a"), 0.01)
    q.add_after(("ns", "a"), 60)
    assert await asyncio.wait_for(q.get(), 2) == ("ns", "a")
    q.done(("ns", "a"))
    q.add_after(("ns", "b"), 0.01)
    q.forget(("ns", "b"))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(q.get(), 0.1)


# -- create expectations: a job's pass waits for the children its last pass created ------------------

def test_arrival_completes_only_when_the_last_expected_child_arrives():
    from rlhf_operator.kube.reconciler import CREATE_EXPECTATION_SECONDS, arrival_completes

    expected = {("Pod", "a"): 100.0, ("Pod", "b"): 100.0, ("Service", "s"): 100.0 - CREATE_EXPECTATION_SECONDS - 1}
    assert not arrival_completes(expected, ("Pod", "a"), now=101.0)
    assert ("Pod", "a") not in expected
    assert arrival_completes(expected, ("Pod", "b"), now=101.0)  # the expired Service no longer holds it
    assert arrival_completes({}, ("Pod", "x"), now=0.0)


def controller():
    from rlhf_operator.builders import BuildSettings
    from rlhf_operator.kube.reconciler import Controller
    from rlhf_operator.metrics import OperatorMetrics

    return Controller(api=None, settings=BuildSettings(), metrics=OperatorMetrics(), pods={}, children={})


def obj(kind, name, generation=1, **meta):
    return {"kind": kind, "metadata": {"name": name, "generation": generation, **meta}}


def test_child_added_while_its_siblings_are_on_their_way_does_not_enqueue():
    import time

    c = controller()
    key = ("ns", "job")
    c.record(key).expected = {("Pod", "job-actor-0"): time.monotonic(), ("ConfigMap", "job-config"): time.monotonic()}
    c.child_changed(key, obj("Pod", "job-actor-0"), "ADDED")
    assert len(c.queue) == 0
    c.child_changed(key, obj("Pod", "stranger"), "ADDED")  # not one we created: reconcile now
    assert len(c.queue) == 1


def test_last_expected_child_and_other_child_changes_enqueue():
    import time

    c = controller()
    key = ("ns", "job")
    c.record(key).expected = {("Pod", "job-actor-0"): time.monotonic()}
    c.child_changed(key, obj("Pod", "job-actor-0"), "ADDED")
    assert len(c.queue) == 1
    c2 = controller()
    c2.record(key).expected = {("Pod", "job-actor-0"): time.monotonic(), ("Pod", "job-actor-1"): time.monotonic()}
    c2.child_changed(key, obj("Pod", "job-actor-0"), "MODIFIED")  # a phase change always counts
    assert len(c2.queue) == 1


def test_job_status_change_waits_for_pending_creates_but_a_spec_change_does_not():
    import time

    key = ("ns", "job")
    c = controller()
    c.record(key).expected = {("Pod", "job-actor-0"): time.monotonic()}
    c.record(key).planned_generation = 1
    c.job_changed(key, obj("RLHFJob", "job", generation=1), "MODIFIED")
    assert len(c.queue) == 0
    c.job_changed(key, obj("RLHFJob", "job", generation=2), "MODIFIED")
    assert len(c.queue) == 1
    c2 = controller()
    c2.record(key).planned_generation = 1
    c2.job_changed(key, obj("RLHFJob", "job", generation=1), "MODIFIED")  # nothing pending: reconcile
    assert len(c2.queue) == 1
    c3 = controller()
    c3.record(key).expected = {("Pod", "job-actor-0"): time.monotonic()}
    c3.record(key).planned_generation = 1
    c3.job_changed(key, obj("RLHFJob", "job", deletionTimestamp="2026-01-01T00:00:00Z"), "MODIFIED")
    assert len(c3.queue) == 1


# -- a child the API server refuses (422) fails the job instead of a retry loop ------------------------


class RefusingApi:
    """Records writes; refuses Services as the API server refuses an invalid one (422, a Status body)."""

    def __init__(self):
        self.created, self.status_patches, self.events = [], [], []

    async def create(self, obj):
        from rlhf_operator.kube.executor import ApiError

        if obj["kind"] == "Service":
            body = ('{"kind":"Status","status":"Failure","reason":"Invalid","code":422,"message":"Service \\"j\\" '
                    'is invalid: metadata.name: Invalid value: \\"j\\": a DNS-1035 label must consist of lower case '
                    'alphanumeric characters"}')
            raise ApiError("POST", "/api/v1/namespaces/ns/services", 422, body)
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True

    async def delete(self, *args):
        return True

    async def patch_job_status(self, namespace, name, patch):
        """The job as stored: a new resourceVersion per write, the status merged as the API server merges it."""
        self.status_patches.append(patch)
        self.status = {k: v for k, v in {**getattr(self, "status", {}), **patch}.items() if v is not None}
        return {"metadata": {"name": name, "resourceVersion": str(100 + len(self.status_patches))},
                "status": dict(self.status)}

    async def post_event(self, job, type_, reason, message, name=""):
        self.events.append((type_, reason, message))
        return True

    async def post_recurring_event(self, job, type_, reason, message):
        return await self.post_event(job, type_, reason, message)


async def test_a_child_refused_as_invalid_fails_the_job_with_the_api_message_once():
    from rlhf_operator.builders import BuildSettings
    from rlhf_operator.kube.reconciler import Controller
    from rlhf_operator.metrics import OperatorMetrics

    api = RefusingApi()
    c = Controller(api=api, settings=BuildSettings(), metrics=OperatorMetrics(), pods={}, children={})
    key = ("ns", "j")
    c.record(key).body = {"apiVersion": constants.API_VERSION, "kind": constants.KIND,
                   "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "1"},
                   "spec": {"algorithm": "sft", "image": "t", "model": {"path": "tiny://llama"},
                            "dataset": {"path": "synthetic://instructions"}, "roles": [{"name": "actor"}]}}
    delay = await c.reconcile(key)
    assert delay == 0.0
    [patch] = api.status_patches
    assert patch["phase"] == "Failed"
    [failed] = [cond for cond in patch["conditions"] if cond["type"] == "Failed"]
    assert failed["reason"] == "ChildRejected"
    assert failed["message"].startswith("the API server refused a child of the job: Service \"j\" is invalid: "
                                        "metadata.name")
    assert [(t, r) for t, r, _ in api.events] == [("Warning", "ChildRejected")]
    assert "a DNS-1035 label must consist of" in api.events[0][2]

    # The next pass reads the Failed status: nothing is created again, no second event.
    created = list(api.created)
    c.record(key).body = {**c.record(key).body, "status": c.record(key).written[1]}
    await c.reconcile(key)
    assert api.created == created
    assert [r for _, r, _ in api.events] == ["ChildRejected"]


# -- the per-job record and action dispatch ------------------------------------------------------------

def test_forget_drops_the_whole_record():
    c = controller()
    key = ("ns", "job")
    c.job_changed(key, obj("RLHFJob", "job"), "ADDED")
    record = c.record(key)
    record.expected, record.failures, record.planned_generation = {("Pod", "job-actor-0"): 1.0}, 2, 1
    c.forget(key)
    assert key not in c.records
    assert c.record(key).expected == {} and c.record(key).failures == 0  # a job seen again starts over


class FakeApi:
    """Records the writes a pass stages (plain values instead of coroutines)."""

    def create(self, body):
        return ("create", body["kind"], body["metadata"]["name"])

    def delete(self, api_version, kind, namespace, name):
        return ("delete", kind, name)


def test_actions_are_staged_by_their_type():
    from rlhf_operator import planner
    from rlhf_operator.kube.reconciler import JobRecord, _Writes

    c = controller()
    c.api = FakeApi()
    record, staged = JobRecord(), _Writes()
    event = planner.EmitEvent("Normal", "GangCreated", "m")
    for action in (planner.CreateObject(obj("Pod", "job-actor-0")), planner.CreateObject(obj("Pod", "job-actor-0")),
                   planner.DeletePods(("job-actor-1",)), planner.DeleteObject("v1", "Service", "job"), event,
                   planner.DeleteJob()):
        c._stage(action, staged, record, "ns", 5.0)
    # the second create of the same child is already expected: sent once
    assert staged.writes == [("create", "Pod", "job-actor-0"), ("delete", "Pod", "job-actor-1"),
                             ("delete", "Service", "job")]
    assert record.expected == {("Pod", "job-actor-0"): 5.0}
    assert staged.events == [event] and staged.delete_job


def test_an_unknown_action_type_is_refused():
    from rlhf_operator.kube.reconciler import JobRecord, _Writes

    with pytest.raises(TypeError, match="unknown planner action"):
        controller()._stage(object(), _Writes(), JobRecord(), "ns", 0.0)


def test_marking_pods_not_retriable_is_one_merge_patch_per_pod():
    from rlhf_operator import planner
    from rlhf_operator.kube.reconciler import JobRecord, _Writes

    class AnnotatingApi:
        def annotate(self, api_version, kind, namespace, name, annotations):
            return ("annotate", kind, namespace, name, annotations)

    c = controller()
    c.api = AnnotatingApi()
    staged = _Writes()
    action = planner.AnnotatePods(("job-actor-0", "job-critic-0"), (("kueue.x-k8s.io/retriable-in-group", "false"),))
    c._stage(action, staged, JobRecord(), "ns", 0.0)
    assert staged.writes == [("annotate", "Pod", "ns", n, {"kueue.x-k8s.io/retriable-in-group": "false"})
                             for n in ("job-actor-0", "job-critic-0")]


# -- status writes are checked: only a 404 naming the job means it is gone ------------------------------

MISSING_SUBRESOURCE = '{"kind":"Status","status":"Failure","message":"the server could not find the requested ' \
                      'resource","reason":"NotFound","details":{},"code":404}'
JOB_GONE = '{"kind":"Status","status":"Failure","message":"rlhfjobs.rlhf.dev \\"j\\" not found","reason":"NotFound",' \
           '"details":{"name":"j","group":"rlhf.dev","kind":"rlhfjobs"},"code":404}'


@pytest.mark.parametrize(("body", "gone"), [
    (JOB_GONE, True),
    (MISSING_SUBRESOURCE, False),
    ("404 page not found", False),
    (JOB_GONE.replace('"name":"j"', '"name":"other"'), False),
], ids=["the-job-is-gone", "no-status-subresource", "plain-text", "another-object"])
def test_object_gone_only_when_the_404_names_the_job(body, gone):
    from rlhf_operator.kube.executor import object_gone

    assert object_gone(body, "j") is gone


class FlakyStatusApi(RefusingApi):
    """Accepts every child; the first status write fails as on a CRD without the status subresource."""

    def __init__(self):
        super().__init__()
        self.deleted = []

    async def create(self, obj):
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True

    async def delete(self, api_version, kind, namespace, name):
        self.deleted.append(name)
        return True

    async def patch_job_status(self, namespace, name, patch):
        from rlhf_operator.kube.executor import ApiError

        if not self.status_patches:
            self.status_patches.append(patch)
            raise ApiError("PATCH", f"/apis/rlhf.dev/v1alpha1/namespaces/{namespace}/rlhfjobs/{name}/status", 404,
                           MISSING_SUBRESOURCE)
        return await super().patch_job_status(namespace, name, patch)


async def test_a_failed_status_write_is_retried_from_the_status_it_decided_never_read_as_deleted():
    from rlhf_contract import wire
    from rlhf_operator.builders import BuildSettings
    from rlhf_operator.kube.executor import ApiError
    from rlhf_operator.kube.reconciler import Controller
    from rlhf_operator.metrics import OperatorMetrics

    api = FlakyStatusApi()
    key = ("ns", "j")
    running = {"phase": "Running", "restarts": 0, "attempt": 0, "conditions": [
        {"type": "Created", "status": "True", "reason": "GangCreated", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}], "startTime": "2026-01-01T00:00:00Z"}
    crashed = {"metadata": {"name": "j-actor-0", "namespace": "ns", "labels": {
        wire.LABEL_JOB: "j", wire.LABEL_ROLE: "actor", wire.LABEL_ROLE_INDEX: "0", wire.LABEL_RESTART_ATTEMPT: "0"}},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
            "exitCode": 1, "finishedAt": "2026-01-01T00:05:00Z"}}}]}}
    c = Controller(api=api, settings=BuildSettings(), metrics=OperatorMetrics(), pods={key: [crashed]},
                   children={key: [{"kind": k, "metadata": {"name": n}} for k, n in
                                   (("Service", "j"), ("ConfigMap", "j-config"),
                                    ("PersistentVolumeClaim", "j-checkpoints"))]})
    c.record(key).body = {"apiVersion": constants.API_VERSION, "kind": constants.KIND,
                          "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1,
                                       "resourceVersion": "5"},
                          "spec": {"algorithm": "sft", "image": "t", "model": {"path": "tiny://llama"},
                                   "dataset": {"path": "synthetic://instructions"}, "roles": [{"name": "actor"}]},
                          "status": running}
    with pytest.raises(ApiError):
        await c.reconcile(key)  # the restart is decided and the pod deleted; the status write fails
    assert api.deleted == ["j-actor-0"] and api.status_patches[0]["restarts"] == 1
    # Its events wait for the write that records the transition: only the write failure is told now.
    assert [r for _, r, _ in api.events] == ["StatusWriteFailed"]

    # The next pass sees the same stored status (Running, restarts 0) and the crashed pod, still there:
    # it plans from the status it decided, so the restart is not counted twice, and writes it again.
    await c.reconcile(key)
    assert api.status_patches[1]["restarts"] == 1
    assert c.record(key).written[1]["restarts"] == 1 and c.record(key).unsaved is None
    assert [r for _, r, _ in api.events] == ["StatusWriteFailed", "PodFailed", "GangRestart"]
