"""The operator against the real control plane, as the chart's ServiceAccount under the chart's RBAC:
children of every example (admitted under Pod Security restricted), kubelet-driven phases, gang
restarts, permanent failures, progress, deletion (owner references collected by the real garbage
collector), and the metrics that follow them."""

from __future__ import annotations

import http.server
import json
import re
import threading

import pytest
import yaml
from operator_kube import (
    EXAMPLES,
    NS,
    apply,
    config_json,
    env_of,
    events,
    example,
    get,
    job,
    metric,
    pods,
    set_all,
    wait_phase,
    wait_pods,
)
from rlhf_operator import api, builders

from tests.controlplane import kube

SETTINGS = builders.BuildSettings()
# Files of one job; a pipeline file (several jobs chained by fromJob) has its own e2e test.
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.yaml")
                       if sum(1 for d in yaml.safe_load_all(p.read_text()) if d) == 1)


def parsed(obj) -> api.Job:
    return api.parse_job({**obj, "metadata": {**obj["metadata"], "uid": "u", "namespace": NS}})


@pytest.mark.parametrize("file", EXAMPLE_FILES)
def test_every_example_gets_its_children(cluster, operator, file):
    name = f"ex-{file.removesuffix('.yaml')}"[:40]
    manifest = example(file, name)
    expected = parsed(manifest)
    apply(cluster, manifest)
    names = builders.gang_pod_names(expected)
    got = wait_pods(cluster, name, len(names))
    assert sorted(got) == sorted(names)
    uid = job(cluster, name)["metadata"]["uid"]
    for pod_name, pod in got.items():
        refs = pod["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [("RLHFJob", name, uid, True)]
        env = env_of(pod)
        role = pod["metadata"]["labels"]["rlhf.dev/role"]
        assert env["RLHF_JOB"] == name and env["RLHF_ROLE"] == role
        assert env["RLHF_RESTART_ATTEMPT"] == "0"
        assert env["RLHF_CONFIG"] == "/etc/rlhf/config.json"
        assert pod["spec"]["hostname"] == pod_name and pod["spec"]["subdomain"] == name
        assert pod["spec"]["restartPolicy"] == "Never"
    service = get(cluster, "services", name)
    assert service["spec"]["clusterIP"] == "None"
    assert config_json(cluster, name) == builders.build_trainer_config(expected).to_dict()
    claim = expected.spec.checkpoint.volume
    pvc = get(cluster, "persistentvolumeclaims", f"{name}-checkpoints")
    assert (pvc is None) == bool(claim.existing_claim)
    group = builders.build_pod_group(expected, SETTINGS)
    if group is not None:
        plural = "podgroups." + group["apiVersion"].split("/")[0]
        stored = kube.wait_for(lambda: kube.get_json(cluster, plural, name, "-n", NS), what="podgroup")
        assert stored["spec"]["minMember"] == len(names)
        assert stored["metadata"]["ownerReferences"][0]["uid"] == uid
    kube.kubectl(cluster, "delete", "rlhfjob", name, "-n", NS, "--wait=false")


def test_phases_follow_the_pods_and_metrics_follow_the_phases(cluster, operator):
    name = "life-run"
    apply(cluster, example("ppo-tiny.yaml", name))
    names = wait_pods(cluster, name, 3)
    set_all(cluster, names, "Running")
    status = wait_phase(cluster, name, "Running")["status"]
    assert status["restarts"] == 0
    assert {r: c["running"] for r, c in status["roles"].items()} == {"actor": 1, "critic": 1, "reference": 1}
    # The gauge follows the status write of the same pass.
    kube.wait_for(lambda: metric(operator, "rlhf_operator_job_phase", namespace=NS, job=name, phase="Running") == 1,
                  what="job_phase Running")
    assert metric(operator, "rlhf_operator_time_to_running_seconds_count") >= 1
    set_all(cluster, [f"{name}-actor-0"], "Succeeded", exit_code=0)  # the actors' exit ends the job
    wait_phase(cluster, name, "Succeeded")
    assert metric(operator, "rlhf_operator_jobs_succeeded_total") >= 1
    assert metric(operator, "rlhf_operator_job_phase", namespace=NS, job=name, phase="Succeeded") == 1


def test_a_failed_pod_restarts_the_whole_gang(cluster, operator):
    name = "life-restart"
    apply(cluster, example("ppo-tiny.yaml", name, failurePolicy={"maxRestarts": 2, "backoffSeconds": 1}))
    first = wait_pods(cluster, name, 3)
    set_all(cluster, first, "Running")
    wait_phase(cluster, name, "Running")
    restarts_before = metric(operator, "rlhf_operator_jobs_restarts_total")
    kube.set_pod_status(cluster, f"{name}-critic-0", "Failed", exit_code=1, namespace=NS)
    second = wait_pods(cluster, name, 3, attempt=1, timeout=30)
    assert {env_of(p)["RLHF_RESTART_ATTEMPT"] for p in second.values()} == {"1"}
    assert {p["metadata"]["uid"] for p in second.values()}.isdisjoint({p["metadata"]["uid"] for p in first.values()})
    assert job(cluster, name)["status"]["restarts"] == 1
    set_all(cluster, second, "Running")
    status = wait_phase(cluster, name, "Running")["status"]
    assert status["restarts"] == 1
    assert metric(operator, "rlhf_operator_jobs_restarts_total") == restarts_before + 1
    assert metric(operator, "rlhf_operator_job_restarts", namespace=NS, job=name) == 1
    assert metric(operator, "rlhf_operator_restart_latency_seconds_count") >= 1
    reasons = {(e["type"], e["reason"]) for e in events(cluster, name)}
    assert {("Warning", "PodFailed"), ("Warning", "GangRestart")} <= reasons


def test_an_eviction_restarts_the_gang_without_using_a_restart(cluster, operator):
    """Issue 18, part 5: the Eviction API (what a node drain uses) takes a pod; the gang restarts as a
    disruption, counted apart from maxRestarts (here 0: a failure would fail the job)."""
    name = "life-evict"
    apply(cluster, example("ppo-tiny.yaml", name, failurePolicy={"maxRestarts": 0, "backoffSeconds": 1}))
    first = wait_pods(cluster, name, 3)
    set_all(cluster, first, "Running")
    wait_phase(cluster, name, "Running")
    before = metric(operator, "rlhf_operator_jobs_disruptions_total") or 0
    victim = f"{name}-critic-0"
    kube.api_request(cluster, "POST", f"/api/v1/namespaces/{NS}/pods/{victim}/eviction",
                     {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": NS}})
    second = wait_pods(cluster, name, 3, attempt=1, timeout=60)
    assert {env_of(p)["RLHF_RESTART_ATTEMPT"] for p in second.values()} == {"1"}
    status = job(cluster, name)["status"]
    assert (status["restarts"], status["disruptions"], status["attempt"]) == (0, 1, 1), status
    assert metric(operator, "rlhf_operator_jobs_disruptions_total") == before + 1
    assert ("Warning", "GangDisrupted") in {(e["type"], e["reason"]) for e in events(cluster, name)}


def test_a_spec_edit_is_rolled_out_as_a_new_gang_with_the_new_config(cluster, operator):
    """Issue 18, part 3: a hyperparameter edit of a running job updates the trainer config and restarts
    the gang from the last checkpoint; an immutable field's edit is refused by the API server."""
    name = "life-edit"
    manifest = example("sft-tiny.yaml", name)
    apply(cluster, manifest)
    first = wait_pods(cluster, name, 1)
    set_all(cluster, first, "Running")
    wait_phase(cluster, name, "Running")
    steps = manifest["spec"]["hyperparameters"]["maxSteps"]
    assert config_json(cluster, name)["hyperparameters"]["max_steps"] == steps
    kube.kubectl(cluster, "patch", "rlhfjob", name, "-n", NS, "--type=merge",
                 "-p", json.dumps({"spec": {"hyperparameters": {"maxSteps": steps + 20}}}))
    wait_pods(cluster, name, 1, attempt=1, timeout=60)
    assert config_json(cluster, name)["hyperparameters"]["max_steps"] == steps + 20
    status = job(cluster, name)["status"]
    assert (status["restarts"], status["attempt"], status["observedGeneration"]) == (0, 1, 2), status
    assert ("Normal", "SpecChanged") in {(e["type"], e["reason"]) for e in events(cluster, name)}
    refused = kube.kubectl(cluster, "patch", "rlhfjob", name, "-n", NS, "--type=merge",
                           "-p", json.dumps({"spec": {"model": {"path": "tiny://qwen2"}}}), check=False)
    assert refused.returncode != 0 and "model is immutable" in refused.stderr, refused.stderr


def test_a_permanent_exit_code_fails_the_job_without_restarting(cluster, operator):
    name = "life-permanent"
    apply(cluster, example("sft-tiny.yaml", name))
    first = wait_pods(cluster, name, 1)
    set_all(cluster, first, "Running")
    wait_phase(cluster, name, "Running")
    set_all(cluster, first, "Failed", exit_code=78)
    status = wait_phase(cluster, name, "Failed")["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "PermanentError"
    assert status.get("restarts", 0) == 0
    assert all(p["metadata"]["labels"]["rlhf.dev/restart-attempt"] == "0" for p in pods(cluster, name).values())
    assert metric(operator, "rlhf_operator_jobs_failed_total", reason="PermanentError") >= 1


class _TrainerMetrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def trainer_metrics():
    """A stand-in trainer /metrics on 127.0.0.1 (the pod IP the test gives actor-0)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TrainerMetrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_progress_comes_from_the_actor_rank0_metrics(cluster, rlhf_release, trainer_metrics, tmp_path):
    _TrainerMetrics.body = (b'rlhf_trainer_step{role="actor",rank="0"} 12\n'
                            b'rlhf_trainer_reward_mean{role="actor",rank="0"} 0.75\n'
                            b'rlhf_trainer_kl{role="actor",rank="0"} 0.02\n'
                            b'rlhf_trainer_last_checkpoint_step{role="actor",rank="0"} 10\n')
    port = trainer_metrics.server_address[1]
    op = rlhf_release.operator(cluster, tmp_path / "operator.log", "--trainer-metrics-port", str(port),
                               "--progress-interval", "0.5", "--log-level", "debug")
    try:
        name = "life-progress"
        apply(cluster, example("dpo-tiny.yaml", name))
        names = wait_pods(cluster, name, 2)
        set_all(cluster, names, "Running", pod_ip="127.0.0.1")
        got = kube.wait_for(lambda: (j := job(cluster, name)) and j.get("status", {}).get("progress", {}).get("step") == 12 and j,
                               what="progress step 12")
        progress = got["status"]["progress"]
        assert (progress["rewardMean"], progress["kl"], progress["lastCheckpointStep"]) == (0.75, 0.02, 10)
        assert progress["updatedAt"]
        _TrainerMetrics.body = b'rlhf_trainer_step{role="actor",rank="0"} 13\n'
        kube.wait_for(lambda: job(cluster, name)["status"]["progress"]["step"] == 13, what="step 13 (periodic re-read)")
        # The gauge follows the status write of the same pass.
        kube.wait_for(lambda: metric(op, "rlhf_operator_job_step", namespace=NS, job=name) == 13, what="job_step 13")
        # An alarm: the Degraded condition and the progress of the same pass reach the stored status (the
        # API server refused every status write of a job with an alarm while the CRD's enum lacked Degraded).
        _TrainerMetrics.body = (b'rlhf_trainer_step{role="actor",rank="0"} 14\n'
                                b'rlhf_trainer_alarms_info{NegativeKL="mean KL -0.2 < -0.05"} 1.0\n')
        degraded = kube.wait_for(lambda: next((c for c in job(cluster, name)["status"].get("conditions", [])
                                               if c["type"] == "Degraded"), None), what="the Degraded condition")
        assert (degraded["status"], degraded["reason"]) == ("True", "NegativeKL"), degraded
        stored = job(cluster, name)["status"]["progress"]
        assert stored["step"] == 14 and stored["alarms"] == {"NegativeKL": "mean KL -0.2 < -0.05"}, stored
        # --log-level debug: a line per pass (the module's operator may have created the pods first)
        assert re.search(rf"DEBUG .* pass {NS}/{name}: \d+ pods, \d+ children -> \[.*\], phase ", op.log_tail(10**6))
    finally:
        op.stop()
        kube.kubectl(cluster, "delete", "rlhfjob", "life-progress", "-n", NS, "--wait=false", check=False)


def test_deleting_the_job_removes_children_and_series(cluster, operator):
    name = "life-delete"
    apply(cluster, example("grpo-tiny.yaml", name, checkpoint={"volume": {"size": "1Gi", "retain": False}}))
    names = wait_pods(cluster, name, 2)
    kube.wait_for(lambda: get(cluster, "configmaps", f"{name}-config"), what="configmap")
    set_all(cluster, names, "Running")
    wait_phase(cluster, name, "Running")
    # The gauge follows the status write of the same pass.
    kube.wait_for(lambda: metric(operator, "rlhf_operator_job_phase", namespace=NS, job=name, phase="Running") == 1,
                  what="job_phase Running")
    kube.kubectl(cluster, "delete", "rlhfjob", name, "-n", NS)
    kube.wait_for(lambda: not pods(cluster, name), what="pods garbage-collected")
    # Background deletion: the garbage collector removes each child on its own, and a claim only goes once
    # the pvc-protection controller has seen its pods gone.
    for kind, child in (("services", name), ("configmaps", f"{name}-config"),
                        ("persistentvolumeclaims", f"{name}-checkpoints")):
        kube.wait_for(lambda kind=kind, child=child: get(cluster, kind, child) is None, what=f"{kind} {child} deleted")
    kube.wait_for(lambda: "job=\"life-delete\"" not in operator.scrape(), what="per-job series removed")


def test_jobs_carry_no_finalizer(cluster, operator):
    name = "life-nofinalizer"
    apply(cluster, example("rm-tiny.yaml", name))
    wait_pods(cluster, name, 1)
    assert not job(cluster, name)["metadata"].get("finalizers")
    assert f"pass {NS}/{name}:" not in operator.log_tail(10**6)  # one line per pass only at --log-level debug
    kube.kubectl(cluster, "delete", "rlhfjob", name, "-n", NS)
    assert job(cluster, name) is None



def test_a_finished_job_is_deleted_after_its_ttl(cluster, operator):
    name = "life-ttl"
    apply(cluster, example("rm-tiny.yaml", name, ttlSecondsAfterFinished=1))
    names = wait_pods(cluster, name, 1)
    set_all(cluster, names, "Succeeded", exit_code=0)
    kube.wait_for(lambda: job(cluster, name) is None, what="job deleted by its TTL")


def test_pods_refused_by_admission_show_as_a_warning_event_on_the_job(cluster, operator):
    name = "life-refused"
    apply(cluster, example("rm-tiny.yaml", name, scheduling={"priorityClassName": "no-such-class"}))
    event = kube.wait_for(lambda: next((e for e in events(cluster, name) if e["reason"] == "RequestRefused"), None),
                          timeout=30, what="a RequestRefused event")
    assert event["type"] == "Warning" and "no PriorityClass with name no-such-class" in event["message"], event
    assert not pods(cluster, name)
    kube.kubectl(cluster, "delete", "rlhfjob", name, "-n", NS)


def test_the_job_namespace_refuses_a_pod_that_breaks_pod_security_restricted(cluster, operator):
    """The gang pods above were admitted under `restricted`; a root pod with no seccomp profile is not."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root-pod"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "1"]}]}}
    result = kube.kubectl(cluster, "apply", "-n", NS, "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode != 0 and 'violates PodSecurity "restricted:latest"' in result.stderr, result.stderr
    assert get(cluster, "pods", "root-pod") is None
