"""builders: job -> desired child objects (pods, Service, ConfigMap, PVC, PodGroup)."""

from __future__ import annotations

import copy
import dataclasses
import json
from fractions import Fraction

import kubernetes_validate
import pytest
from rlhf_contract.wire import (
    LABEL_JOB,
    LABEL_RESTART_ATTEMPT,
    LABEL_ROLE,
    LABEL_ROLE_INDEX,
)
from rlhf_operator import builders
from rlhf_operator.api import parse_job
from rlhf_operator.builders import BuildSettings
from rlhf_operator.constants import (
    ANNOTATION_VOLCANO_GROUP,
    LABEL_COSCHEDULING_GROUP,
    LABEL_KUEUE_QUEUE,
)

SETTINGS = BuildSettings()

PPO_ROLES = [
    {"name": "actor", "replicas": 2},
    {"name": "critic"},
    {"name": "reference", "colocateWith": "actor"},
]


def make_job(roles=None, name="ppo-tiny", namespace="team-a", **spec):
    """A parsed job from a manifest: a rule-reward PPO job unless overridden."""
    body = {
        "algorithm": "ppo",
        "image": "trainer:1",
        "model": {"path": "tiny://llama"},
        "reward": {"type": "rule", "rule": "exact_match"},
        "dataset": {"path": "synthetic://arithmetic"},
        "roles": copy.deepcopy(roles if roles is not None else PPO_ROLES),
    }
    body.update(spec)
    return parse_job({"metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": 3},
                      "spec": body})


def env_of(pod):
    """The container env as {name: value} (valueFrom entries as their dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def pod_by_name(pods, name):
    return next(p for p in pods if p["metadata"]["name"] == name)


# --- gang layout ------------------------------------------------------------------------------

GANG_CASES = {
    "ppo with reference colocated into actor": (
        dict(roles=PPO_ROLES),
        ["ppo-tiny-actor-0", "ppo-tiny-actor-1", "ppo-tiny-critic-0"],
    ),
    "ppo with a reward model, every role its own pods": (
        dict(roles=[{"name": "actor"}, {"name": "critic"}, {"name": "reference"}, {"name": "reward"}],
             reward={"type": "model"}, rewardModel={"path": "/models/rm"}),
        ["ppo-tiny-actor-0", "ppo-tiny-critic-0", "ppo-tiny-reference-0", "ppo-tiny-reward-0"],
    ),
    "dpo": (
        dict(algorithm="dpo", roles=[{"name": "actor", "replicas": 2}, {"name": "reference", "replicas": 2}],
             dataset={"path": "synthetic://pairs", "format": "pairs"}),
        ["ppo-tiny-actor-0", "ppo-tiny-actor-1", "ppo-tiny-reference-0", "ppo-tiny-reference-1"],
    ),
    "sft with three replicas": (
        dict(algorithm="sft", roles=[{"name": "actor", "replicas": 3}], hyperparameters={"batchSize": 9},
             dataset={"path": "synthetic://instructions", "format": "instruction"}),
        ["ppo-tiny-actor-0", "ppo-tiny-actor-1", "ppo-tiny-actor-2"],
    ),
}


@pytest.mark.parametrize("case", GANG_CASES)
def test_gang_has_one_pod_per_replica_of_each_role_with_pods(case):
    kwargs, names = GANG_CASES[case]
    job = make_job(**kwargs)
    pods = builders.build_gang(job, attempt=0, settings=SETTINGS)
    assert [p["metadata"]["name"] for p in pods] == names
    assert builders.gang_pod_names(job) == names
    for pod in pods:
        labels = pod["metadata"]["labels"]
        role, index = labels[LABEL_ROLE], labels[LABEL_ROLE_INDEX]
        assert pod["metadata"]["name"] == f"ppo-tiny-{role}-{index}"
        assert labels[LABEL_JOB] == "ppo-tiny"
        assert pod["spec"]["hostname"] == pod["metadata"]["name"]
        assert pod["spec"]["subdomain"] == "ppo-tiny"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["terminationGracePeriodSeconds"] == 30
        assert pod["metadata"]["namespace"] == "team-a"


def test_env_contract_of_an_actor_pod_with_a_colocated_reference():
    job = make_job()
    pod = builders.build_role_pod(job, job.spec.role("actor"), 1, 2, SETTINGS)
    host = "{}.ppo-tiny.team-a.svc.cluster.local"
    assert env_of(pod) == {
        "RLHF_JOB": "ppo-tiny",
        "RLHF_ROLE": "actor",
        "RLHF_ROLE_RANK": "1",
        "RLHF_ROLE_REPLICAS": "2",
        "RLHF_PROCESSES_PER_POD": "1",
        "RLHF_COLOCATED_ROLES": "reference",
        "RLHF_CONFIG": "/etc/rlhf/config.json",
        "RLHF_ROLE_ADDRS": f"actor={host.format('ppo-tiny-actor-0')}:29500,"
                           f"critic={host.format('ppo-tiny-critic-0')}:29500",
        "RLHF_BRIDGE_ADDR": f"{host.format('ppo-tiny-actor-0')}:29501",
        "RLHF_CHECKPOINT_DIR": "/checkpoints",
        "RLHF_RESTART_ATTEMPT": "2",
        "RLHF_METRICS_PORT": "9400",
        "RLHF_TERMINATION_GRACE_SECONDS": "30",
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "HF_HOME": "/tmp/.cache/huggingface",
        "TRITON_CACHE_DIR": "/tmp/.cache/triton",
        "TORCH_EXTENSIONS_DIR": "/tmp/.cache/torch_extensions",
        "POD_IP": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    assert pod["metadata"]["labels"][LABEL_RESTART_ATTEMPT] == "2"


def test_critic_pod_serves_no_colocated_role_and_has_no_bridge_port():
    job = make_job()
    pod = builders.build_role_pod(job, job.spec.role("critic"), 0, 0, SETTINGS)
    assert env_of(pod)["RLHF_COLOCATED_ROLES"] == ""
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports == {"role": 29500, "metrics": 9400}
    actor = builders.build_role_pod(job, job.spec.role("actor"), 0, 0, SETTINGS)
    assert {p["name"] for p in actor["spec"]["containers"][0]["ports"]} == {"role", "bridge", "metrics"}


def test_settings_change_addresses_service_account_and_metrics_port():
    settings = BuildSettings(trainer_service_account="sa-x", cluster_domain="k8s.example", trainer_metrics_port=9999)
    job = make_job()
    pod = builders.build_role_pod(job, job.spec.role("actor"), 0, 0, settings)
    env = env_of(pod)
    assert env["RLHF_METRICS_PORT"] == "9999"
    assert env["RLHF_BRIDGE_ADDR"] == "ppo-tiny-actor-0.ppo-tiny.team-a.svc.k8s.example:29501"
    assert pod["spec"]["serviceAccountName"] == "sa-x"
    assert builders.role_addrs(job, settings) == {
        "actor": "ppo-tiny-actor-0.ppo-tiny.team-a.svc.k8s.example:29500",
        "critic": "ppo-tiny-critic-0.ppo-tiny.team-a.svc.k8s.example:29500",
    }


def test_bridge_lives_with_the_role_hosting_a_colocated_actor():
    # The trainer refuses this layout (the actor must have pods); the builders still stay consistent.
    job = make_job(algorithm="dpo", roles=[{"name": "actor"}, {"name": "reference"}],
                   dataset={"path": "synthetic://pairs", "format": "pairs"})
    roles = (dataclasses.replace(job.spec.role("actor"), colocate_with="reference"), job.spec.role("reference"))
    job = dataclasses.replace(job, spec=dataclasses.replace(job.spec, roles=roles))
    assert builders.gang_pod_names(job) == ["ppo-tiny-reference-0"]
    pod = builders.build_gang(job, 0, SETTINGS)[0]
    assert env_of(pod)["RLHF_BRIDGE_ADDR"].startswith("ppo-tiny-reference-0.")
    assert env_of(pod)["RLHF_COLOCATED_ROLES"] == "actor"
    assert "bridge" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def test_role_image_overrides_the_job_image_and_pull_policy_is_passed():
    job = make_job(roles=[{"name": "actor", "image": "actor:2"}, {"name": "critic"}, {"name": "reference"}],
                   imagePullPolicy="Always")
    pods = builders.build_gang(job, 0, SETTINGS)
    images = {p["metadata"]["name"]: p["spec"]["containers"][0]["image"] for p in pods}
    assert images == {"ppo-tiny-actor-0": "actor:2", "ppo-tiny-critic-0": "trainer:1",
                      "ppo-tiny-reference-0": "trainer:1"}
    assert {p["spec"]["containers"][0]["imagePullPolicy"] for p in pods} == {"Always"}
    assert pods[0]["spec"]["containers"][0]["command"] == ["python", "-m", "rlhf_trainer"]


# --- resources, placement --------------------------------------------------------------------

RESOURCE_CASES = {
    "no gpus keeps the role's resources as written": (
        {"resources": {"requests": {"cpu": "1"}, "limits": {"memory": "4Gi"}}},
        {"requests": {"cpu": "1"}, "limits": {"memory": "4Gi"}},
    ),
    "gpus go into requests and limits": (
        {"gpus": 2, "resources": {"requests": {"cpu": "1"}}},
        {"requests": {"cpu": "1", "nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}},
    ),
    "gpus with no resources at all": (
        {"gpus": 1},
        {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
    ),
    "no gpus and no resources": ({}, {}),
}


@pytest.mark.parametrize("case", RESOURCE_CASES)
def test_container_resources(case):
    role_fields, want = RESOURCE_CASES[case]
    job = make_job(algorithm="sft", roles=[{"name": "actor", **role_fields}],
                   dataset={"path": "synthetic://instructions", "format": "instruction"})
    before = copy.deepcopy(job.spec.role("actor").resources)
    pod = builders.build_gang(job, 0, SETTINGS)[0]
    assert pod["spec"]["containers"][0]["resources"] == want
    assert job.spec.role("actor").resources == before  # the spec is never mutated


def test_gpu_roles_tolerate_the_gpu_taint_once_and_keep_user_tolerations_and_node_selector():
    user_toleration = {"key": "team", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}
    job = make_job(roles=[
        {"name": "actor", "gpus": 1, "tolerations": [user_toleration], "nodeSelector": {"gpu": "h100"}},
        {"name": "critic", "gpus": 1, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
        {"name": "reference", "gpus": 1},  # every role with pods has GPUs, or none has (api._gpu_mix_errors)
    ])
    pods = {p["metadata"]["labels"][LABEL_ROLE]: p["spec"] for p in builders.build_gang(job, 0, SETTINGS)}
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pods["actor"]["tolerations"] == [user_toleration, gpu]
    assert pods["actor"]["nodeSelector"] == {"gpu": "h100"}
    assert pods["critic"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pods["reference"]["tolerations"] == [gpu] and "nodeSelector" not in pods["reference"]
    # a job without GPUs asks for no GPU node
    assert all("tolerations" not in p["spec"] for p in builders.build_gang(make_job(), 0, SETTINGS))


def test_pod_security_and_volumes():
    job = make_job()
    spec = builders.build_gang(job, 0, SETTINGS)[0]["spec"]
    container = spec["containers"][0]
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                       "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "rlhf-trainer"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts.keys() == volumes.keys() == {"config", "checkpoints", "dshm", "tmp"}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/rlhf", "readOnly": True}
    assert volumes["config"]["configMap"] == {"name": "ppo-tiny-config"}
    assert mounts["checkpoints"]["mountPath"] == "/checkpoints"
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "ppo-tiny-checkpoints"}
    assert (mounts["dshm"]["mountPath"], volumes["dshm"]["emptyDir"]) == ("/dev/shm", {"medium": "Memory"})
    assert (mounts["tmp"]["mountPath"], volumes["tmp"]["emptyDir"]) == ("/tmp", {})


# --- gang schedulers and queues --------------------------------------------------------------

SCHEDULER_CASES = {
    "none: plain default scheduler, no PodGroup": (
        "", "none", None, None,
    ),
    "volcano chosen by the job": (
        "volcano", "none", "volcano", "scheduling.volcano.sh/v1beta1",
    ),
    "coscheduling chosen by the job": (
        "coscheduling", "none", "scheduler-plugins-scheduler", "scheduling.x-k8s.io/v1alpha1",
    ),
    "operator default volcano when the job leaves it unset": (
        "", "volcano", "volcano", "scheduling.volcano.sh/v1beta1",
    ),
    "job's none overrides the operator's default": (
        "none", "volcano", None, None,
    ),
}


@pytest.mark.parametrize("case", SCHEDULER_CASES)
def test_gang_scheduler_choice(case):
    job_choice, default, scheduler_name, pod_group_api = SCHEDULER_CASES[case]
    settings = BuildSettings(default_gang_scheduler=default)
    scheduling = {"gangScheduler": job_choice} if job_choice else {}
    job = make_job(scheduling=scheduling)
    pod = builders.build_gang(job, 0, settings)[0]
    assert pod["spec"].get("schedulerName") == scheduler_name
    pod_group = builders.build_pod_group(job, settings)
    assert (pod_group or {}).get("apiVersion") == pod_group_api
    volcano = pod_group_api == "scheduling.volcano.sh/v1beta1"
    coscheduling = pod_group_api == "scheduling.x-k8s.io/v1alpha1"
    assert (pod["metadata"].get("annotations", {}).get(ANNOTATION_VOLCANO_GROUP) == "ppo-tiny") is volcano
    assert (pod["metadata"]["labels"].get(LABEL_COSCHEDULING_GROUP) == "ppo-tiny") is coscheduling
    support = builders.build_support_objects(job, settings)
    assert [o["kind"] for o in support] == ["Service", "ConfigMap", "PersistentVolumeClaim"] + ["PodGroup"] * (
        pod_group is not None)
    assert builders.support_object_refs(job, settings) == [(o["kind"], o["metadata"]["name"]) for o in support]


def test_volcano_pod_group_carries_queue_priority_and_summed_requests():
    job = make_job(
        roles=[{"name": "actor", "replicas": 2, "gpus": 1, "resources": {"requests": {"cpu": "1500m", "memory": "2Gi"}}},
               {"name": "critic", "gpus": 1, "resources": {"limits": {"cpu": "1", "memory": "512Mi"}}},
               {"name": "reference", "colocateWith": "actor"}],
        scheduling={"gangScheduler": "volcano", "queue": "research", "priorityClassName": "high"},
    )
    pod_group = builders.build_pod_group(job, SETTINGS)
    assert pod_group["metadata"]["name"] == "ppo-tiny"
    assert pod_group["spec"] == {
        "minMember": 3,
        "queue": "research",
        "priorityClassName": "high",
        # cpu 2 x 1.5 + 1 (critic's limit stands in for its request), memory 4Gi + 512Mi, GPUs 2 x 1 + 1
        "minResources": {"cpu": "4", "memory": "4608Mi", "nvidia.com/gpu": "3"},
    }
    for pod in builders.build_gang(job, 0, SETTINGS):
        assert pod["spec"]["priorityClassName"] == "high"
        assert LABEL_KUEUE_QUEUE not in pod["metadata"]["labels"]  # a Volcano queue, not a Kueue one


def test_coscheduling_pod_group_times_out_with_the_gang():
    job = make_job(scheduling={"gangScheduler": "coscheduling", "gangTimeoutSeconds": 120})
    spec = builders.build_pod_group(job, SETTINGS)["spec"]
    assert spec["minMember"] == 3
    assert spec["scheduleTimeoutSeconds"] == 120


def test_kueue_queue_labels_every_pod_as_one_group_per_attempt():
    job = make_job(scheduling={"queue": "team-a-queue"})
    pods = builders.build_gang(job, 4, SETTINGS)
    for pod in pods:
        assert pod["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "team-a-queue"
        assert pod["metadata"]["labels"][builders.LABEL_KUEUE_POD_GROUP] == "ppo-tiny-attempt-4"
        assert pod["metadata"]["annotations"][builders.ANNOTATION_KUEUE_POD_GROUP_TOTAL] == str(len(pods))


def test_unknown_gang_scheduler_names_the_field():
    job = make_job()
    with pytest.raises(ValueError, match="gangScheduler"):
        builders.build_pod_group(job, BuildSettings(default_gang_scheduler="yunikorn"))


# --- support objects -------------------------------------------------------------------------


def test_headless_service_selects_the_jobs_pods_before_they_are_ready():
    service = builders.build_service(make_job())
    assert service["metadata"]["name"] == "ppo-tiny"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {LABEL_JOB: "ppo-tiny"}


def test_config_map_holds_the_trainer_config_as_sorted_json():
    job = make_job(hyperparameters={"maxSteps": 7, "clipRange": 0.3}, checkpoint={"intervalSteps": 2, "keep": 1})
    cm = builders.build_config_map(job)
    assert cm["metadata"]["name"] == "ppo-tiny-config"
    text = cm["data"]["config.json"]
    config = json.loads(text)
    assert config == builders.build_trainer_config(job).to_dict()
    assert text == json.dumps(config, indent=2, sort_keys=True)
    assert config["hyperparameters"]["max_steps"] == 7
    assert config["hyperparameters"]["clip_range"] == 0.3
    assert config["checkpoint"] == {"interval_steps": 2, "keep": 1}
    assert config["roles"]["reference"] == {"replicas": 1, "colocate_with": "actor", "processes_per_pod": 1,
                                            "deepspeed": config["roles"]["reference"]["deepspeed"],
                                            "lora": config["roles"]["reference"]["lora"]}
    assert config["roles"]["reference"]["lora"]["rank"] == 0
    assert config["reward_model"] is None
    assert (config["job"], config["namespace"], config["algorithm"]) == ("ppo-tiny", "team-a", "ppo")


PVC_CASES = {
    "default: new retained RWO claim, no owner": (
        {}, {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}, False,
    ),
    "not retained: owned, deleted with the job": (
        {"retain": False, "size": "1Gi"},
        {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}, True,
    ),
    "storage class passed through": (
        {"storageClassName": "nfs"},
        {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}},
         "storageClassName": "nfs"}, False,
    ),
}


@pytest.mark.parametrize("case", PVC_CASES)
def test_checkpoint_claim(case):
    volume, want_spec, owned = PVC_CASES[case]
    pvc = builders.build_pvc(make_job(checkpoint={"volume": volume}))
    assert pvc["metadata"]["name"] == "ppo-tiny-checkpoints"
    assert pvc["spec"] == want_spec
    assert ("ownerReferences" in pvc["metadata"]) is owned


def test_existing_claim_is_mounted_and_no_claim_is_created():
    job = make_job(checkpoint={"volume": {"existingClaim": "shared-ckpt"}})
    assert builders.build_pvc(job) is None
    support = builders.build_support_objects(job, SETTINGS)
    assert "PersistentVolumeClaim" not in [o["kind"] for o in support]
    assert builders.support_object_refs(job, SETTINGS) == [(o["kind"], o["metadata"]["name"]) for o in support]
    pod = builders.build_gang(job, 0, SETTINGS)[0]
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "checkpoints")
    assert claim["persistentVolumeClaim"] == {"claimName": "shared-ckpt"}


def test_every_child_is_owned_by_the_job_as_controller():
    settings = BuildSettings(default_gang_scheduler="volcano")
    job = make_job(checkpoint={"volume": {"retain": False}})
    children = builders.build_gang(job, 0, settings) + builders.build_support_objects(job, settings)
    assert len(children) == 3 + 4
    for child in children:
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob", "name": "ppo-tiny", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True,
        }], child["kind"]
        assert child["metadata"]["labels"][LABEL_JOB] == "ppo-tiny"


VALIDATION_JOBS = {
    "ppo, colocated reference, volcano, gpus": dict(
        roles=[{"name": "actor", "gpus": 1, "resources": {"requests": {"cpu": "1"}}},
               {"name": "critic", "gpus": 1, "tolerations": [{"key": "a", "operator": "Exists"}]},
               {"name": "reference", "colocateWith": "actor"}],
        scheduling={"gangScheduler": "volcano", "priorityClassName": "p"},
    ),
    "dpo, kueue queue, storage class": dict(
        algorithm="dpo", roles=[{"name": "actor"}, {"name": "reference"}],
        dataset={"path": "/data/pairs.jsonl", "format": "pairs"},
        scheduling={"queue": "lq"}, checkpoint={"volume": {"storageClassName": "fast", "retain": False}},
    ),
}


@pytest.mark.parametrize("case", VALIDATION_JOBS)
def test_core_objects_pass_strict_kubernetes_schema_validation(case):
    job = make_job(**VALIDATION_JOBS[case])
    objects = builders.build_gang(job, 1, SETTINGS) + builders.build_support_objects(job, SETTINGS)
    core = [o for o in objects if o["apiVersion"] == "v1"]
    assert {o["kind"] for o in core} >= {"Pod", "Service", "ConfigMap", "PersistentVolumeClaim"}
    for obj in core:
        kubernetes_validate.validate(obj, "1.36", strict=True)


# --- quantities ------------------------------------------------------------------------------

QUANTITIES = {
    "plain integer": ("4", Fraction(4), "4"),
    "millicores": ("1500m", Fraction(3, 2), "1500m"),
    "binary suffix": ("2Gi", Fraction(2 * 2**30), "2Gi"),
    "decimal suffix": ("1G", Fraction(10**9), "1000000000"),
    "int value": (3, Fraction(3), "3"),
    "exponent": ("1e3", Fraction(1000), "1000"),
    "mebibytes": ("512Mi", Fraction(512 * 2**20), "512Mi"),
}


@pytest.mark.parametrize("case", QUANTITIES)
def test_quantity_parse_and_format(case):
    text, value, formatted = QUANTITIES[case]
    assert builders.parse_quantity(text) == value
    assert builders.format_quantity(value) == formatted
    assert builders.parse_quantity(builders.format_quantity(value)) == value


def test_bad_quantity_names_the_value():
    with pytest.raises(ValueError, match="'lots'"):
        builders.parse_quantity("lots")


def test_the_termination_grace_period_reaches_the_pod_and_the_trainer():
    job = make_job(terminationGracePeriodSeconds=600)
    for pod in builders.build_gang(job, 0, SETTINGS):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert pod["spec"]["terminationGracePeriodSeconds"] == 600
        assert env["RLHF_TERMINATION_GRACE_SECONDS"] == "600"


def test_a_pod_of_several_processes_says_how_many_and_opens_a_metrics_port_for_each():
    job = make_job(roles=[{"name": "actor", "replicas": 2, "gpus": 4}, {"name": "critic", "gpus": 2, "processesPerPod": 2},
                          {"name": "reference", "colocateWith": "actor"}])
    actor = builders.build_role_pod(job, job.spec.role("actor"), 1, 0, SETTINGS)
    assert env_of(actor)["RLHF_PROCESSES_PER_POD"] == "4"  # gpus: one process per GPU
    ports = {p["name"]: p["containerPort"] for p in actor["spec"]["containers"][0]["ports"]}
    base = SETTINGS.trainer_metrics_port
    assert {k: v for k, v in ports.items() if k.startswith("metrics")} == {
        "metrics": base, "metrics-1": base + 1, "metrics-2": base + 2, "metrics-3": base + 3}
    critic = builders.build_role_pod(job, job.spec.role("critic"), 0, 0, SETTINGS)
    assert env_of(critic)["RLHF_PROCESSES_PER_POD"] == "2"
    config = builders.build_trainer_config(job)
    assert (config.roles["actor"].processes_per_pod, config.roles["critic"].processes_per_pod) == (4, 2)
    assert config.placements()["actor"].ranks == 8


# --- experiment trackers ------------------------------------------------------------------------

TRACKERS = {"wandb": {"enabled": True, "mode": "offline", "apiKeySecret": {"name": "wandb", "key": "api-key"}},
            "mlflow": {"enabled": True, "trackingUri": "https://mlflow.example", "tokenSecret": {"name": "ml", "key": "t"}}}


def test_tracker_secrets_become_secret_key_ref_env_on_actor_pods_only():
    job = make_job(roles=[{"name": "actor", "replicas": 2}, {"name": "critic"}, {"name": "reference"}],
                   trackers=TRACKERS)
    pods = builders.build_gang(job, 0, SETTINGS)
    for name in ("ppo-tiny-actor-0", "ppo-tiny-actor-1"):
        env = env_of(pod_by_name(pods, name))
        assert env["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
        assert env["MLFLOW_TRACKING_TOKEN"] == {"secretKeyRef": {"name": "ml", "key": "t"}}
    for name in ("ppo-tiny-critic-0", "ppo-tiny-reference-0"):
        assert not {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN"} & set(env_of(pod_by_name(pods, name)))
    kubernetes_validate.validate(pod_by_name(pods, "ppo-tiny-actor-0"), "1.36", strict=True)


def test_a_disabled_tracker_passes_no_secret():
    job = make_job(trackers={"wandb": {**TRACKERS["wandb"], "enabled": False}})
    assert "WANDB_API_KEY" not in env_of(builders.build_gang(job, 0, SETTINGS)[0])


def test_tracker_settings_reach_the_trainer_config_without_the_secrets():
    job = make_job(trackers=TRACKERS)
    text = builders.build_config_map(job)["data"]["config.json"]
    trackers = json.loads(text)["trackers"]
    assert trackers["wandb"] == {"enabled": True, "project": "", "entity": "", "mode": "offline", "group": ""}
    assert trackers["mlflow"]["tracking_uri"] == "https://mlflow.example"
    assert "Secret" not in text and "api-key" not in text
