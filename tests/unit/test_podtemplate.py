"""Pod template overrides (issue 18, part 1): the merge rule as a table, and the pods it builds.

The refusals (what the operator owns) are cases of tests/unit/cases/rlhfjob_invalid.yaml, where the CRD
and parse_spec are checked to agree; a platform's full template is a case of rlhfjob_valid.yaml.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
import rlhfjob_cases as cases
from rlhf_operator import builders
from rlhf_operator.api import parse_job
from rlhf_operator.podtemplate import PodTemplate, apply_pod_template, strategic_merge

MERGES = {
    "maps merge key by key, the template wins": (
        {"nodeSelector": {"pool": "cpu", "zone": "a"}}, {"nodeSelector": {"pool": "a100"}},
        {"nodeSelector": {"pool": "a100", "zone": "a"}}),
    "a new container is appended": (
        {"containers": [{"name": "trainer", "image": "t"}]}, {"containers": [{"name": "proxy", "image": "p"}]},
        {"containers": [{"name": "trainer", "image": "t"}, {"name": "proxy", "image": "p"}]}),
    "a known container is merged into by name": (
        {"containers": [{"name": "trainer", "image": "t", "env": [{"name": "HOME", "value": "/tmp"}]}]},
        {"containers": [{"name": "trainer", "env": [{"name": "HOME", "value": "/home"}, {"name": "HF_TOKEN",
                                                                                          "value": "x"}]}]},
        {"containers": [{"name": "trainer", "image": "t", "env": [{"name": "HOME", "value": "/home"},
                                                                   {"name": "HF_TOKEN", "value": "x"}]}]}),
    "volume mounts merge by mountPath": (
        {"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
        {"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        {"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "data", "mountPath": "/data"}]}),
    "tolerations are appended (no merge key)": (
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
        {"tolerations": [{"key": "dedicated", "operator": "Exists"}]},
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "dedicated", "operator": "Exists"}]}),
    "a list without a rule is replaced": ({"args": ["a"]}, {"args": ["b"]}, {"args": ["b"]}),
    "a scalar is replaced": ({"serviceAccountName": "rlhf-trainer"}, {"serviceAccountName": "irsa"},
                             {"serviceAccountName": "irsa"}),
    "a nested security setting is merged, the rest kept": (
        {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000}}, {"securityContext": {"runAsUser": 2000}},
        {"securityContext": {"runAsNonRoot": True, "runAsUser": 2000}}),
}


@pytest.mark.parametrize("name", MERGES)
def test_strategic_merge(name):
    base, patch, want = MERGES[name]
    before = repr(base)
    assert strategic_merge(base, patch) == want
    assert repr(base) == before  # the inputs are not changed


def platform_job(**scheduling):
    manifest = cases.build({"base": "ppo-tiny", "set": {
        "sharedMemorySize": "2Gi",
        "podTemplate": {
            "metadata": {"labels": {"team": "ml"}, "annotations": {"sidecar.istio.io/inject": "false"}},
            "spec": {"serviceAccountName": "irsa", "imagePullSecrets": [{"name": "registry"}],
                     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}],
                     "containers": [{"name": "trainer", "env": [{"name": "HF_TOKEN", "valueFrom": {
                         "secretKeyRef": {"name": "hf", "key": "token"}}}, {"name": "HF_HOME", "value": "/data/hf"}],
                         "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                         {"name": "log-shipper", "image": "fluent-bit:3"}]}},
        "roles[0].gpus": 1, "roles[1].gpus": 1, "roles[2].gpus": 1,  # every role with pods on GPUs
        "roles[0].sharedMemorySize": "8Gi",
        "roles[0].podTemplate": {"metadata": {"labels": {"team": "actor-team"}},
                                 "spec": {"nodeSelector": {"pool": "a100"}, "schedulerName": "my-scheduler"}},
        **{f"scheduling.{k}": v for k, v in scheduling.items()},
    }})
    return parse_job(manifest)


def pods_by_role(job):
    return {pod["metadata"]["labels"]["rlhf.dev/role"]: pod for pod in builders.build_gang(job, 0, builders.BuildSettings())}


def trainer(pod):
    return next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")


def test_the_job_template_then_the_role_template_over_the_built_pod():
    pods = pods_by_role(platform_job())
    actor, critic = pods["actor"], pods["critic"]
    # metadata: added, the role's over the job's, the operator's kept
    assert actor["metadata"]["labels"]["team"] == "actor-team" and critic["metadata"]["labels"]["team"] == "ml"
    assert actor["metadata"]["labels"]["rlhf.dev/role"] == "actor"
    assert critic["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    # scalars replaced, lists merged or appended
    assert actor["spec"]["serviceAccountName"] == "irsa" and actor["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert [t["key"] for t in actor["spec"]["tolerations"]] == ["nvidia.com/gpu", "dedicated"]
    assert critic["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                             {"key": "dedicated", "operator": "Equal", "value": "ml",
                                              "effect": "NoSchedule"}]
    assert actor["spec"]["nodeSelector"] == {"pool": "a100"} and "nodeSelector" not in critic["spec"]
    assert actor["spec"]["schedulerName"] == "my-scheduler" and "schedulerName" not in critic["spec"]
    assert [v["name"] for v in actor["spec"]["volumes"]] == ["config", "checkpoints", "dshm", "tmp", "data"]
    assert [c["name"] for c in actor["spec"]["containers"]] == ["trainer", "log-shipper"]
    env = {e["name"]: e for e in trainer(actor)["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["HF_HOME"]["value"] == "/data/hf"  # a default of the operator's, overridden
    assert env["RLHF_ROLE"]["value"] == "actor"  # the contract untouched
    assert [m["mountPath"] for m in trainer(actor)["volumeMounts"]] == ["/etc/rlhf", "/checkpoints", "/dev/shm",
                                                                        "/tmp", "/data"]
    # the trainer's own parts stay
    assert trainer(actor)["command"] == ["python", "-m", "rlhf_trainer"]
    assert trainer(actor)["securityContext"]["readOnlyRootFilesystem"] is True
    # /dev/shm: the role's size over the job's
    shm = {role: next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm") for role, pod in pods.items()}
    assert shm["actor"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert shm["critic"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_the_merged_pods_are_valid_kubernetes_pods():
    for pod in pods_by_role(platform_job()).values():
        kubernetes_validate.validate(pod, "1.36", strict=True)


def test_a_template_changes_the_rollout_digest():
    plain = parse_job(cases.build({"base": "ppo-tiny"}))
    settings = builders.BuildSettings()
    assert builders.rollout_hash(plain, settings) != builders.rollout_hash(platform_job(), settings)


def test_an_empty_template_builds_the_same_pod():
    job = parse_job(cases.build({"base": "ppo-tiny"}))
    pod = builders.build_gang(job, 0, builders.BuildSettings())[0]
    assert apply_pod_template(pod, PodTemplate(), keep={}) is pod
