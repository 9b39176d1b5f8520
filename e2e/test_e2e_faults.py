"""Fault injection through the operator: random role kills, a crashing operator, a permanent error.

Bounded: a couple of kills per run here; bench/faults.py runs many more trials (local runner).
"""

import json
import random
import time

import pytest
from e2e_support import NAMESPACE, REAL, example, unique, wait_for
from rlhf_operator import report
from test_e2e_jobs import JOB_TIMEOUT, complete_steps, diagnostics


def actor_step(cluster, name):
    """The actor's latest step: its metrics file on the (stand-in) node, else status.progress."""
    if cluster.kubelet is not None:
        try:
            rows = cluster.checkpoint_dir(name) / "metrics" / "actor-0.jsonl"
        except LookupError:  # the checkpoint claim is not created or bound yet
            return 0
        lines = rows.read_text().splitlines() if rows.exists() else []
        return len(lines)  # lines written so far: grows with every step, including redone ones
    return ((cluster.job(name) or {}).get("status", {}).get("progress") or {}).get("step", 0)


def test_random_role_kills_restart_the_gang_and_redo_at_most_one_interval(cluster, operator):
    rng = random.Random(7)
    name, interval, kills, steps = unique("ppo-kill"), 5, 2, 40
    # Enough steps that a kill lands mid-training: a tiny PPO step takes about 0.1 s on a CPU.
    cluster.apply(example("ppo-tiny.yaml", name, maxSteps=steps, checkpoint={"intervalSteps": interval},
                          failurePolicy={"maxRestarts": kills + 1, "backoffSeconds": 1}))
    killed = []
    for attempt in range(kills):
        wait_for(lambda attempt=attempt: (st := (cluster.job(name) or {}).get("status", {})).get("phase") == "Running"
                         and st.get("restarts", 0) == attempt, timeout=180, what="gang running")
        seen = actor_step(cluster, name)
        wait_for(lambda seen=seen: actor_step(cluster, name) > seen, timeout=180, what="a new step")
        time.sleep(rng.uniform(0, 1.0))
        victim = cluster.kill_random_pod(name, rng)
        assert victim, diagnostics(cluster, operator, name)
        killed.append(victim)
    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    assert job["status"]["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    assert job["status"]["restarts"] == kills, f"killed {killed}\n" + diagnostics(cluster, operator, name)
    ckpt = cluster.checkpoint_dir(name)
    assert complete_steps(ckpt)[-1] == steps
    history = report.history(report.read_jsonl(ckpt / "metrics" / "actor-0.jsonl"))
    assert history.last_step == steps
    assert all(redone <= interval for redone in history.steps_redone), history.steps_redone


def test_operator_killed_mid_reconcile_makes_no_duplicates_or_orphans(cluster, operator):
    if operator is None:
        pytest.skip("the operator runs in the cluster (E2E_OPERATOR_IN_CLUSTER=1): nothing local to kill")
    name = unique("ppo-opkill")
    cluster.apply(example("ppo-tiny.yaml", name, maxSteps=6, checkpoint={"intervalSteps": 2}))
    # Kill it right after it began creating the gang, then twice more while the job runs.
    wait_for(lambda: cluster.pods(name), timeout=60, interval=0.01, what="first pod created")
    for _ in range(3):
        operator.kill()
        pods = cluster.pods(name)
        assert len({p["metadata"]["name"] for p in pods}) == len(pods) <= 3
        operator.start()
        wait_for(lambda: (cluster.job(name) or {}).get("status", {}).get("phase") in ("Running", "Succeeded"),
                         timeout=120, what="running again")
        time.sleep(0.5)
    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    assert job["status"]["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    assert job["status"].get("restarts", 0) == 0  # an operator crash is not a gang failure
    # no pod beyond the gang's deterministic names (serving roles may be gone once the actor finished)
    assert {p["metadata"]["name"] for p in cluster.pods(name)} <= {
        f"{name}-actor-0", f"{name}-critic-0", f"{name}-reference-0"}
    if not REAL:
        # each pod was created (and run) once: the restarted operator adopted what existed
        assert {n: c for n, c in cluster.kubelet.starts.items() if n.startswith(name + "-")} == {
            f"{name}-actor-0": 1, f"{name}-critic-0": 1, f"{name}-reference-0": 1}
        assert not [n for n in cluster.kubelet.running_pods() if n.startswith(name + "-")]
    cluster.kubectl("delete", "rlhfjob", name, "--wait=false")
    wait_for(lambda: not cluster.pods(name), timeout=60, what="pods garbage-collected")


@pytest.mark.skipif(REAL, reason="the malformed dataset file lives on this machine, not on a cluster node")
def test_malformed_dataset_line_fails_once_naming_file_and_line(cluster, operator, tmp_path):
    data = tmp_path / "instructions.jsonl"
    data.write_text(json.dumps({"instruction": "add", "input": "1+1", "output": "2"}) + "\n{not json\n")
    name = unique("sft-baddata")
    obj = example("sft-tiny.yaml", name, maxSteps=4)
    obj["spec"]["dataset"] = {"path": str(data), "format": "instruction"}
    cluster.apply(obj)
    job = cluster.wait_phase(name, timeout=180)
    status = job["status"]
    assert status["phase"] == "Failed", diagnostics(cluster, operator, name)
    assert status.get("restarts", 0) == 0, diagnostics(cluster, operator, name)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentError"
    assert "instructions.jsonl:2" in failed["message"], failed
    if not REAL:
        assert cluster.kubelet.starts[f"{name}-actor-0"] == 1


def test_suspend_mid_run_then_resume_continues_from_checkpoint(cluster, operator):
    name, steps, interval = unique("ppo-suspend"), 80, 5
    cluster.apply(example("ppo-tiny.yaml", name, maxSteps=steps, checkpoint={"intervalSteps": interval}))
    # past the first checkpoint, well before the end
    wait_for(lambda: actor_step(cluster, name) > interval + 1, timeout=180, interval=0.05, what="progress")
    cluster.kubectl("patch", "rlhfjob", name, "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    cluster.wait_phase(name, ("Suspended",), timeout=60)
    wait_for(lambda: not cluster.pods(name), timeout=60, what="pods deleted on suspend")
    if not REAL:
        wait_for(lambda: not [n for n in cluster.kubelet.running_pods() if n.startswith(name + "-")],
                         timeout=30, what="processes stopped on suspend")
    cluster.kubectl("patch", "rlhfjob", name, "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    assert job["status"]["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    history = report.history(report.read_jsonl(cluster.checkpoint_dir(name) / "metrics" / "actor-0.jsonl"))
    assert history.last_step == steps
    # It went on from a checkpoint: at most one interval redone, never back to step 1.
    assert history.restarts <= 1 and all(r <= interval for r in history.steps_redone), history.steps_redone
    assert [r["step"] for r in history.rows].count(1) == 1
