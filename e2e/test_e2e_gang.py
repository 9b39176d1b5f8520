"""Gang scheduling by the real scheduler: scheduler-plugins' Coscheduling plugin and the operator's
PodGroup (minMember = the gang, minResources = its requests).

A job whose gang needs more GPUs than the cluster has stays Pending as a whole: the scheduler
refuses every pod (PodScheduled False), none is bound to a node, none runs. When a second GPU node
joins, the whole gang is placed across both nodes and the job runs to the end.
"""

import pytest
from e2e_support import NODE_POOL, REAL, example, unique, wait_for
from test_e2e_jobs import JOB_TIMEOUT, diagnostics

pytestmark = pytest.mark.skipif(REAL, reason="adds a node to the cluster: the test control plane only")

GPUS_PER_ROLE = 4  # 3 roles x 4 = 12 GPUs; the stand-in node has 8 (tests/controlplane/nodes.DEFAULT_CAPACITY)


def scheduled_condition(pod):
    return next((c for c in pod.get("status", {}).get("conditions", []) if c["type"] == "PodScheduled"), None)


def test_a_gang_larger_than_the_cluster_waits_whole_then_runs_when_a_node_joins(cluster, operator, tmp_path):
    from kubelet import StandInKubelet

    from tests.controlplane import nodes

    node_gpus = int(nodes.DEFAULT_CAPACITY[nodes.GPU])
    assert 3 * GPUS_PER_ROLE > node_gpus >= 2 * GPUS_PER_ROLE  # fits on two nodes, not on one
    name = unique("ppo-gang")
    obj = example("ppo-tiny.yaml", name, maxSteps=4, checkpoint={"intervalSteps": 2})
    obj["spec"]["scheduling"] = {"gangScheduler": "coscheduling"}
    for role in obj["spec"]["roles"]:
        # GPUs for the scheduler to count; one process per pod (processesPerPod defaults to gpus: 12 CPU
        # trainer processes would test ranks, which test_local_ranks_per_pod.py does, not scheduling).
        role.update(gpus=GPUS_PER_ROLE, processesPerPod=1)
    cluster.apply(obj)
    try:
        group = wait_for(lambda: cluster.get_json("podgroups.scheduling.x-k8s.io", name), timeout=60, what="PodGroup")
    except AssertionError:
        print(cluster.kubectl("get", "podgroups.scheduling.x-k8s.io,pods,rlhfjobs", "-o", "wide", check=False))
        print(diagnostics(cluster, operator, name))
        raise
    assert group["spec"]["minMember"] == 3
    assert group["spec"]["minResources"]["nvidia.com/gpu"] == str(3 * GPUS_PER_ROLE)

    # The scheduler has looked at every pod of the gang and refused each one.
    def refused():
        pods = cluster.pods(name)
        return len(pods) == 3 and all((c := scheduled_condition(p)) and c["status"] == "False" for p in pods) and pods

    pods = wait_for(refused, timeout=120, interval=0.5, what="every gang pod refused by the scheduler")
    assert all(scheduled_condition(p)["reason"] == "Unschedulable" for p in pods), [scheduled_condition(p) for p in pods]
    assert not [p["metadata"]["name"] for p in pods if p["spec"].get("nodeName")], "partial placement"
    assert not [p for p in pods if p.get("status", {}).get("phase") != "Pending"]
    status = cluster.job(name)["status"]
    assert status["phase"] == "Creating", status  # the gang exists, not all of it runs
    assert {r: (c["pending"], c["running"]) for r, c in status["roles"].items()} == {
        "actor": (1, 0), "critic": (1, 0), "reference": (1, 0)}
    assert not [n for n in cluster.kubelet.running_pods() if n.startswith(name + "-")]

    joined = StandInKubelet(cluster.cp.kubeconfig, tmp_path / "node-1", "e2e-node-1", node_labels=NODE_POOL,
                            addresses=cluster.kubelet.addresses).start()  # one cluster DNS
    try:
        # Retried at the scheduler's flush of unschedulable pods (cluster.UNSCHEDULABLE_RETRY + up to 30 s).
        placed = wait_for(lambda: len(m := {p["metadata"]["name"]: p["spec"]["nodeName"] for p in cluster.pods(name)
                                             if p["spec"].get("nodeName")}) == 3 and m,
                          timeout=180, interval=0.5, what="the whole gang placed")
        assert sorted(set(placed.values())) == ["e2e-node-0", "e2e-node-1"], placed
        job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
        assert job["status"]["phase"] == "Succeeded", diagnostics(cluster, operator, name)
        assert job["status"].get("restarts", 0) == 0
        assert len(joined.starts) + len([n for n in cluster.kubelet.starts if n.startswith(name + "-")]) == 3
    finally:
        cluster.kubectl("delete", "rlhfjob", name, "--wait=false")
        wait_for(lambda: not cluster.pods(name), timeout=60, what=f"pods of {name} gone")
        joined.stop(delete_node=True)
