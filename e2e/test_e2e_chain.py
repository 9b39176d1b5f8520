"""The StackLLaMA pipeline applied at once (crds/examples/stackllama-tiny.yaml: SFT -> RM -> PPO): the
operator holds each job until the jobs it names in fromJob Succeeded (`kubectl get rlhf` shows what it
waits for), the pods mount the sources' exports read-only, and the source's claim, co-owned by its
dependants, outlives the source job until they are deleted too (the real garbage collector)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from e2e_support import NAMESPACE, REAL, REPO, unique, wait_for
from rlhf_trainer import stackexchange
from test_e2e_jobs import diagnostics

PIPELINE = REPO / "crds" / "examples" / "stackllama-tiny.yaml"
STAGE_TIMEOUT = 420


def pipeline(prefix: str, data_dir) -> list[dict]:
    """The example's three jobs renamed `<prefix>-sft|rm|ppo` (fromJob too), with local dataset paths,
    fewer steps, and an SFT claim that goes with its job (retain: false) so the co-owners matter."""
    text = stackexchange.localize_manifest(PIPELINE.read_text(), data_dir)
    docs = [d for d in yaml.safe_load_all(text) if d]
    renames = {d["metadata"]["name"]: f"{prefix}-{d['metadata']['name'].rsplit('-', 1)[1]}" for d in docs}
    out = []
    for doc in docs:
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"name": renames[doc["metadata"]["name"]], "namespace": NAMESPACE}
        spec = doc["spec"]
        for key in ("model", "rewardModel"):
            if "fromJob" in spec.get(key, {}):
                spec[key]["fromJob"] = renames[spec[key]["fromJob"]]
        spec["hyperparameters"]["maxSteps"] = 6
        spec["checkpoint"] = {**spec["checkpoint"], "intervalSteps": 3}
        out.append(doc)
    out[0]["spec"]["checkpoint"]["volume"] = {"size": "1Gi", "retain": False}
    return out


def printed_columns(cluster, name: str) -> dict[str, str]:
    """`kubectl get rlhf NAME` as {column: value} (the CRD's printer columns)."""
    lines = cluster.kubectl("get", "rlhf", name, "-n", NAMESPACE).stdout.splitlines()
    header, row = lines[0], lines[1]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def pvc(cluster, name: str) -> dict | None:
    return cluster.get_json("persistentvolumeclaim", name)


@pytest.mark.skipif(REAL, reason="the StackQA files are written on this machine; a real cluster needs them in the "
                                 "image or a volume at /data/stackqa")
@pytest.mark.timeout(1500)
def test_stackllama_chain_runs_in_order_from_one_apply(cluster, operator, tmp_path):
    stackexchange.write(stackexchange.convert(stackexchange.read_threads(
        REPO / "crds" / "examples" / "data" / "stackqa.jsonl")), tmp_path)
    prefix = unique("sl")
    docs = pipeline(prefix, tmp_path)
    names = [d["metadata"]["name"] for d in docs]
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump_all(docs))

    # the dependants wait, and say for what
    wait_for(lambda: printed_columns(cluster, names[2]).get("WAITING-FOR") == f"{names[0]}, {names[1]}",
             timeout=60, what="ppo waiting for sft and rm")
    assert printed_columns(cluster, names[1])["WAITING-FOR"] == names[0]
    assert not cluster.pods(names[1]) and not cluster.pods(names[2])

    for name in names:
        job = cluster.wait_phase(name, timeout=STAGE_TIMEOUT)
        assert job["status"]["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    jobs = {name: cluster.job(name) for name in names}
    # each stage's pods were created after its sources had finished
    for source, dependant in ((names[0], names[1]), (names[1], names[2])):
        done = jobs[source]["status"]["completionTime"]
        started = jobs[dependant]["status"]["startTime"]
        assert started >= done, (source, done, dependant, started)
    status = jobs[names[2]]["status"]
    assert "waitingFor" not in status
    assert [s["name"] for s in status["sources"]] == names[:2]
    ready = next(c for c in status["conditions"] if c["type"] == "SourcesReady")
    assert (ready["status"], ready["reason"]) == ("True", "SourcesSucceeded")

    # the PPO pods read the exports through read-only mounts of the sources' claims
    config = json.loads(cluster.get_json("configmap", f"{names[2]}-config")["data"]["config.json"])
    assert (config["model"]["path"], config["reward_model"]["path"]) == (f"/sources/{names[0]}", f"/sources/{names[1]}")
    pod = cluster.get_json("pod", f"{names[2]}-actor-0")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[f"source-{names[0]}"]["persistentVolumeClaim"] == {"claimName": f"{names[0]}-checkpoints",
                                                                     "readOnly": True}
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[f"/sources/{names[1]}"]["subPath"] == "export" and mounts[f"/sources/{names[1]}"]["readOnly"]
    ppo_metrics = cluster.checkpoint_dir(names[2]) / "metrics" / "actor-0.jsonl"
    rows = [json.loads(line) for line in ppo_metrics.read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["reward_mean"], float) and r["kl"] == r["kl"] for r in rows)

    # the SFT claim (retain: false) is co-owned by both dependants: deleting the SFT job keeps it
    claim = f"{names[0]}-checkpoints"
    owners = {r["name"]: r for r in pvc(cluster, claim)["metadata"]["ownerReferences"]}
    assert set(owners) == set(names)
    assert owners[names[0]]["controller"] and not owners[names[1]].get("controller")
    cluster.kubectl("delete", "rlhfjob", names[0], "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    wait_for(lambda: {r["name"] for r in (pvc(cluster, claim) or {"metadata": {}})["metadata"].get(
        "ownerReferences", [])} == set(names[1:]), timeout=60, what="the garbage collector drops the deleted owner")
    assert pvc(cluster, claim) is not None
    cluster.kubectl("delete", "rlhfjob", *names[1:], "-n", NAMESPACE, "--wait=false")
    wait_for(lambda: pvc(cluster, claim) is None, timeout=120, what=f"{claim} deleted with its last owner")
