"""A job's lifecycle with real trainers (issue 18): a spec edit rolled out, a resize, an eviction and a
deletion's SIGTERM, through the operator, the test control plane and the stand-in kubelet.

- a hyperparameter edit (maxSteps) of a running job: a new gang (SpecChanged, not a restart) resumes from
  the last complete checkpoint and stops at the new step count;
- a resize of the actor (1 -> 2 replicas): the new ranks resume through DeepSpeed's universal checkpoint;
- an eviction (the Eviction API, as a node drain) and a pod deleted by someone else restart the gang as
  disruptions: status.disruptions, never status.restarts (maxRestarts 0 there: a counted failure would
  fail the job); the kubelet's SIGTERM makes the trainer save the step it was in and exit 143, so the
  next gang redoes at most one step (no periodic checkpoint in that job);
- the stand-in kubelet itself: a deleted pod gets SIGTERM, its grace period, then SIGKILL.

Small on purpose (tiny models, tens of steps): CI runs them on two cores.
"""

import json
import math
import time

import pytest
from e2e_support import NAMESPACE, REAL, example, unique, wait_for
from rlhf_contract import wire
from rlhf_operator import report
from rlhf_trainer import checkpoint
from test_e2e_jobs import JOB_TIMEOUT, complete_steps, diagnostics

# No periodic checkpoint within these runs: a step saved mid-run was saved on SIGTERM.
NO_PERIODIC = 1000
# A pod the PodSecurity `restricted` level admits (the e2e namespace enforces it).
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

needs_kubelet = pytest.mark.skipif(REAL, reason="reads the stand-in kubelet's processes and logs")


def last_step(cluster, name, rank="actor-0"):
    """The step of the last metrics row the rank wrote (0 before the first, or before the claim is bound)."""
    try:
        rows = cluster.checkpoint_dir(name) / "metrics" / f"{rank}.jsonl"
    except LookupError:  # the checkpoint claim is not created or bound yet
        return 0
    lines = rows.read_text().splitlines() if rows.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_step(cluster, name, above, timeout=240):
    return wait_for(lambda: (s := last_step(cluster, name)) > above and s, timeout=timeout, interval=0.05,
                    what=f"{name} past step {above}")


def steps_ahead(cluster, name, minimum, seconds=8.0, window=3.0):
    """A step count `seconds` of training past the actor's latest step at its pace over `window` seconds
    (at least `minimum` more): a new maxSteps the gang cannot reach before an edit's roll-out stops it,
    however fast this machine trains, that still ends the run soon after."""
    before = last_step(cluster, name)
    time.sleep(window)
    now = last_step(cluster, name)
    return now + max(minimum, math.ceil((now - before) / window * seconds))


def pod_logs(cluster, pod):
    """Every run's log of one pod name, oldest first (the stand-in kubelet's files)."""
    return [path.read_text() for path in cluster.kubelet.logs.get(pod, [])]


def event_reasons(cluster, name):
    got = cluster.get_json("events", "--field-selector", f"involvedObject.name={name}") or {"items": []}
    return {(e["type"], e["reason"]) for e in got["items"]}


def resumed_from(log: str) -> int:
    """The step an actor log says it resumed from (`actor-0: resumed from step N`)."""
    line = next(x for x in log.splitlines() if "resumed from step" in x)
    return int(line.rsplit(" ", 1)[1])


@needs_kubelet
def test_a_max_steps_edit_rolls_out_a_new_gang_that_resumes_and_stops_at_the_new_count(cluster, operator):
    name, interval = unique("sft-edit"), 5
    cluster.apply(example("sft-tiny.yaml", name, maxSteps=300, checkpoint={"intervalSteps": interval}))
    at = wait_step(cluster, name, interval + 1)
    steps = steps_ahead(cluster, name, 20)
    cluster.kubectl("patch", "rlhfjob", name, "-n", NAMESPACE, "--type=merge",
                    "-p", json.dumps({"spec": {"hyperparameters": {"maxSteps": steps}}}))
    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    status = job["status"]
    assert status["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    assert (status.get("restarts", 0), status.get("disruptions", 0), status["attempt"]) == (0, 0, 1), status
    assert ("Normal", "SpecChanged") in event_reasons(cluster, name), diagnostics(cluster, operator, name)
    ckpt = cluster.checkpoint_dir(name)
    assert complete_steps(ckpt)[-1] == steps
    history = report.history(report.read_jsonl(ckpt / "metrics" / "actor-0.jsonl"))
    assert history.last_step == steps
    assert [r["step"] for r in history.rows].count(1) == 1, "the new gang started over"
    # The old gang saved the step it was in on SIGTERM (else the last periodic checkpoint): nothing or
    # at most one interval is computed again.
    assert all(redone <= interval for redone in history.steps_redone), history.steps_redone
    logs = pod_logs(cluster, f"{name}-actor-0")
    assert len(logs) == 2, diagnostics(cluster, operator, name)
    assert at <= resumed_from(logs[1]) < steps, logs[1][-2000:]


@needs_kubelet
def test_an_actor_resize_resumes_through_the_universal_checkpoint(cluster, operator):
    name = unique("sft-resize")
    # No periodic checkpoint: the roll-out's SIGTERM save is the one the new world reshards.
    cluster.apply(example("sft-tiny.yaml", name, maxSteps=300, checkpoint={"intervalSteps": NO_PERIODIC}))
    at = wait_step(cluster, name, 6)
    steps = steps_ahead(cluster, name, 12)
    patch = [{"op": "replace", "path": "/spec/roles/0/replicas", "value": 2},
             {"op": "replace", "path": "/spec/hyperparameters/maxSteps", "value": steps}]
    cluster.kubectl("patch", "rlhfjob", name, "-n", NAMESPACE, "--type=json", "-p", json.dumps(patch))
    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    status = job["status"]
    assert status["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    assert (status.get("restarts", 0), status["attempt"]) == (0, 1), status
    ckpt = cluster.checkpoint_dir(name)
    resumed = {pod: resumed_from(pod_logs(cluster, f"{name}-{pod}")[-1]) for pod in ("actor-0", "actor-1")}
    start = resumed["actor-0"]
    assert resumed == {"actor-0": start, "actor-1": start} and start >= at, resumed
    # saved by one rank, converted once to DeepSpeed's universal layout, loaded by two; saved again by two
    assert checkpoint.saved_world_size(checkpoint.step_dir(ckpt, start) / "actor") == 1
    assert (checkpoint.step_dir(ckpt, start) / "actor" / checkpoint.UNIVERSAL / "latest_universal").is_file()
    assert complete_steps(ckpt)[-1] == steps
    assert checkpoint.saved_world_size(checkpoint.step_dir(ckpt, steps) / "actor") == 2
    for rank in ("actor-0", "actor-1"):
        assert report.history(report.read_jsonl(ckpt / "metrics" / f"{rank}.jsonl")).last_step == steps


@needs_kubelet
def test_an_eviction_and_a_deletion_restart_the_gang_as_disruptions_after_a_sigterm_save(cluster, operator):
    """Two disruptions of one job: the reference evicted (the actor learns of the stop from the marker on
    the checkpoint volume), then the actor's pod deleted with a grace period (its own SIGTERM). Each time
    the gang saves the step it is in and exits 143 within the grace period; the next gang resumes there."""
    name, steps = unique("dpo-disrupt"), 45
    # maxRestarts 0: were a disruption counted as a failure, the job would fail. No periodic checkpoint:
    # a step saved before the end was saved on SIGTERM.
    cluster.apply(example("dpo-tiny.yaml", name, maxSteps=steps, checkpoint={"intervalSteps": NO_PERIODIC, "keep": 10},
                          failurePolicy={"maxRestarts": 0, "backoffSeconds": 1}))
    actor = f"{name}-actor-0"
    at = wait_step(cluster, name, 2)
    victim = f"{name}-reference-0"
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": NAMESPACE}}
    cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{victim}/eviction", "-f", "-",
                    input=json.dumps(eviction))
    # the next gang runs past the step it resumed from
    logs = wait_for(lambda: (got := pod_logs(cluster, actor))[1:] and "resumed from step" in got[1] and got,
                    timeout=240, interval=0.1, what="the second gang resumed")
    resumed = resumed_from(logs[1])
    wait_step(cluster, name, resumed + 1)
    cluster.kubectl("delete", "pod", actor, "-n", NAMESPACE, "--grace-period=60", "--wait=false")

    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    status = job["status"]
    assert status["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    assert (status.get("restarts", 0), status.get("disruptions", 0), status["attempt"]) == (0, 2, 2), status
    assert ("Warning", "GangDisrupted") in event_reasons(cluster, name)
    # Stopped by SIGTERM (143) both times, never SIGKILLed: after the eviction on its own, then on its deletion.
    assert cluster.kubelet.stopped[actor] == [wire.EXIT_STOPPED] * 2, cluster.kubelet.stopped
    first, second, third = pod_logs(cluster, actor)
    assert "saving it first" in first and "saving it first" in second, (first[-1500:], second[-1500:])
    saved = [resumed_from(second), resumed_from(third)]
    ckpt = cluster.checkpoint_dir(name)
    assert saved[0] >= at and saved[1] > saved[0], saved
    assert set(saved) <= set(complete_steps(ckpt)), (saved, complete_steps(ckpt))
    history = report.history(report.read_jsonl(ckpt / "metrics" / "actor-0.jsonl"))
    assert history.last_step == steps
    assert all(redone <= 1 for redone in history.steps_redone), history.steps_redone


# --- the stand-in kubelet's grace period -----------------------------------------------------------


def grace_pod(name, grace_seconds, on_sigterm):
    """A raw pod (labelled as a job's, so the stand-in kubelet runs it) whose process prints `ready`, then on
    SIGTERM prints `SIGTERM` and runs `on_sigterm` (Python statements)."""
    script = ("import signal, sys, time\n"
              "def stop(*_):\n    print('SIGTERM', flush=True)\n" + "".join(f"    {s}\n" for s in on_sigterm) +
              "signal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\n"
              "while True:\n    time.sleep(0.1)\n")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {wire.LABEL_JOB: name}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace_seconds,
                     "securityContext": RESTRICTED_POD,
                     "containers": [{"name": wire.CONTAINER_NAME, "image": "python:3.12-slim",
                                     "command": ["python", "-c", script], "securityContext": RESTRICTED_CONTAINER}]}}


@pytest.mark.parametrize(("pod", "grace"), [
    ({"metadata": {"deletionGracePeriodSeconds": 60}, "spec": {"terminationGracePeriodSeconds": 30}}, 60),
    ({"metadata": {}, "spec": {"terminationGracePeriodSeconds": 30}}, 30),
    ({"metadata": {"deletionGracePeriodSeconds": 0}, "spec": {"terminationGracePeriodSeconds": 30}}, 2),
    ({"metadata": {}, "spec": {}}, 2),
    (None, 2),
], ids=["deletion's grace", "pod's grace", "forced: the minimum", "none: the minimum", "vanished: the minimum"])
def test_termination_grace_seconds_is_the_deletion_s_else_the_pod_s_at_least_two(pod, grace):
    from kubelet import termination_grace_seconds  # e2e/kubelet.py

    assert termination_grace_seconds(pod) == grace


@needs_kubelet
def test_the_kubelet_sends_sigterm_and_kills_only_after_the_grace_period(cluster):
    # Saves for 6.5 s on SIGTERM (longer than the kubelet's former fixed 5 s), within its pod's 20 s.
    slow = grace_pod(unique("grace-slow"), 20, ["time.sleep(6.5)", "sys.exit(0)"])
    # Ignores SIGTERM; its pod says 600 s, the deletion says 3 s: the deletion's wins.
    stubborn = grace_pod(unique("grace-deaf"), 600, ["pass"])
    names = [slow["metadata"]["name"], stubborn["metadata"]["name"]]
    for pod in (slow, stubborn):
        cluster.apply(pod)
    kubelet = cluster.kubelet
    wait_for(lambda: all(any("ready" in log for log in pod_logs(cluster, n)) for n in names), timeout=120,
             what="both processes ready")
    cluster.kubectl("delete", "pod", names[0], "-n", NAMESPACE, "--wait=false")
    cluster.kubectl("delete", "pod", names[1], "-n", NAMESPACE, "--grace-period=3", "--wait=false")
    wait_for(lambda: all(n in kubelet.stopped for n in names), timeout=60, what="both processes stopped")
    assert kubelet.stopped[names[0]] == [0]  # finished its save: not killed at 5 s
    assert kubelet.stopped[names[1]] == [128 + 9]  # SIGKILL after the deletion's 3 s, not the pod's 600 s
    for n in names:
        assert "SIGTERM" in pod_logs(cluster, n)[-1]
    wait_for(lambda: not any(cluster.get_json("pod", n) for n in names), timeout=30,
             what="deletions confirmed by the kubelet")
