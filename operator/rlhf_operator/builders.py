"""Desired child objects of an RLHFJob, as plain dicts: pure functions, no API client (docs/spec.md).

    job -> build_support_objects()  headless Service, ConfigMap (trainer config), PVC, PodGroup
        -> build_gang(attempt, sources)  one pod per (role without colocateWith, replica index), each
                                    mounting the export of every `fromJob` source read-only

Every child is named deterministically (`<job>`, `<job>-config`, `<job>-checkpoints`,
`<job>-<role>-<index>`), so a shell can "create what is missing" after any crash and treat
409 AlreadyExists as success. Settings come in as an argument, never from a global.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

from rlhf_contract import layout, wire
from rlhf_contract import sources as srcs
from rlhf_contract.config import (
    CheckpointConfig,
    DatasetConfig,
    MlflowConfig,
    ModelConfig,
    RoleConfig,
    TrackersConfig,
    TrainerConfig,
    WandbConfig,
    dump_config,
)
from rlhf_contract.wire import (
    BRIDGE_PORT,
    CHECKPOINT_MOUNT,
    CONFIG_FILE,
    CONFIG_MOUNT,
    CONTAINER_NAME,
    EXPORT_DIR,
    LABEL_JOB,
    LABEL_RESTART_ATTEMPT,
    LABEL_ROLE,
    LABEL_ROLE_INDEX,
    ROLE_PORT,
    TRAINER_COMMAND,
    TRAINER_METRICS_PORT,
    TRAINER_UID,
)

from rlhf_operator.api import DATASET_PATHS, MAX_LABEL_LENGTH, Job, JobSpec, ModelSource, RoleSpec
from rlhf_operator.constants import (
    ANNOTATION_VOLCANO_GROUP,
    API_VERSION,
    KIND,
    LABEL_COSCHEDULING_GROUP,
    LABEL_KUEUE_QUEUE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from rlhf_operator.podtemplate import apply_pod_template

GPU_RESOURCE = "nvidia.com/gpu"
VOLCANO_API_VERSION = "scheduling.volcano.sh/v1beta1"
COSCHEDULING_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
# Without these two, Kueue admits plain pods one by one, which would break the gang.
LABEL_KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
ANNOTATION_KUEUE_POD_GROUP_TOTAL = "kueue.x-k8s.io/pod-group-total-count"
# Most clusters (and every single-node test cluster) have only RWO storage; a multi-node job needs
# an RWX class (NFS, CephFS, Filestore...) passed as storageClassName, or an existingClaim.
CHECKPOINT_ACCESS_MODE = "ReadWriteOnce"
SCRATCH_MOUNT = "/tmp"
# A `fromJob` source's export folder is mounted read-only at /sources/<source job> (subPath export of the
# source's checkpoint claim). Read-only mounts of one claim by many pods: any number of pods on the node
# the volume is attached to for ReadWriteOnce, on any node for ReadWriteMany / ReadOnlyMany (docs/spec.md).
SOURCE_MOUNT = "/sources"
# The root filesystem is read-only, so every cache the image points into its home (Hugging Face,
# Triton, DeepSpeed's JIT ops) is redirected to the writable emptyDir at /tmp.
SCRATCH_ENV = {
    "HOME": SCRATCH_MOUNT,
    "XDG_CACHE_HOME": f"{SCRATCH_MOUNT}/.cache",
    "HF_HOME": f"{SCRATCH_MOUNT}/.cache/huggingface",
    "TRITON_CACHE_DIR": f"{SCRATCH_MOUNT}/.cache/triton",
    "TORCH_EXTENSIONS_DIR": f"{SCRATCH_MOUNT}/.cache/torch_extensions",
}


@dataclass(frozen=True)
class BuildSettings:
    """Operator-wide choices that are not in the job spec (flags of `rlhf-operator operator`)."""

    trainer_service_account: str = "rlhf-trainer"
    cluster_domain: str = "cluster.local"
    default_gang_scheduler: str = "none"  # used when spec.scheduling.gangScheduler == ""
    trainer_metrics_port: int = TRAINER_METRICS_PORT  # the trainers' /metrics (RLHF_METRICS_PORT)
    # The name the scheduler-plugins chart gives its second scheduler.
    coscheduling_scheduler_name: str = "scheduler-plugins-scheduler"


# --- names -----------------------------------------------------------------------------------


def pod_name(job_name: str, role: str, index: int) -> str:
    return f"{job_name}-{role}-{index}"


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def pvc_name(job_name: str) -> str:
    return f"{job_name}-checkpoints"


def checkpoint_claim_name(job: Job) -> str:
    """The claim the pods mount: the user's existing claim, or the one we create."""
    return job.spec.checkpoint.volume.existing_claim or pvc_name(job.name)


def gang_scheduler(job: Job, settings: BuildSettings) -> str:
    """volcano | coscheduling | none: the job's choice, else the operator's default."""
    return job.spec.scheduling.gang_scheduler or settings.default_gang_scheduler


def gang_pod_names(job: Job) -> list[str]:
    """Names of every pod of the gang, in creation order."""
    return [pod_name(job.name, r.name, i) for r in job.spec.pod_roles() for i in range(r.replicas)]


def host_role(spec: JobSpec, role: str) -> str:
    """The role whose pods run `role` (itself unless colocated)."""
    return layout.host_role(role, spec.placements)


# --- trainer config --------------------------------------------------------------------------


def source_model_path(source_job: str) -> str:
    """Where a pod sees the exported model of the job `source_job` (build_gang mounts it there)."""
    return f"{SOURCE_MOUNT}/{source_job}"


def local_path(text: str, repo_type: str) -> str:
    """Where a pod sees a path field's source (rlhf_contract.sources.trainer_path): image paths as they
    are, pvc:// at its read-only mount, hf:// and s3:// in the job's source cache."""
    return srcs.trainer_path(srcs.parse_source(text), repo_type) if "://" in text else text


def model_config(source: ModelSource | None) -> ModelConfig | None:
    """The trainer's view of a model: a folder path, `fromJob` resolved to the source's mount, a source
    URI to where the pods see it."""
    if source is None:
        return None
    return ModelConfig(path=source_model_path(source.from_job) if source.from_job else local_path(source.path, "model"))


def dataset_config(dataset: DatasetConfig) -> DatasetConfig:
    """The dataset section with every path field's source resolved to where the pods see it."""
    return replace(dataset, **{name: local_path(getattr(dataset, name), "dataset") for name, _ in DATASET_PATHS})


def build_trainer_config(job: Job) -> TrainerConfig:
    """The trainer's config.json (docs/spec.md): the spec's shared fields, roles as a map."""
    spec = job.spec
    return TrainerConfig(
        job=job.name,
        namespace=job.namespace,
        algorithm=spec.algorithm,
        model=model_config(spec.model),
        reward_model=model_config(spec.reward_model),
        reward=spec.reward,
        critic=replace(spec.critic, model=local_path(spec.critic.model, "model")),
        dataset=dataset_config(spec.dataset),
        roles={r.name: _shared(r, RoleConfig) for r in spec.roles},
        hyperparameters=spec.hyperparameters,
        checkpoint=_shared(spec.checkpoint, CheckpointConfig),
        # The Secrets' names stay out of the config: only the actor pods' env refers to them.
        trackers=TrackersConfig(wandb=_shared(spec.trackers.wandb, WandbConfig),
                                mlflow=_shared(spec.trackers.mlflow, MlflowConfig)),
    )


def _shared(obj: Any, cls: type) -> Any:
    """The contract part of a manifest object that extends a contract class (RoleSpec -> RoleConfig)."""
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})


# --- addresses -------------------------------------------------------------------------------


def pod_host(job: Job, role: str, index: int, settings: BuildSettings) -> str:
    """Stable DNS name of a pod through the headless Service (hostname + subdomain)."""
    return f"{pod_name(job.name, role, index)}.{job.name}.{job.namespace}.svc.{settings.cluster_domain}"


def role_addrs(job: Job, settings: BuildSettings) -> dict[str, str]:
    """role -> "host:port" of rank 0 of the role's own torch.distributed world.

    Only roles with pods of their own have a world; a colocated role is served in-process by its
    host role (RLHF_COLOCATED_ROLES) and has no address.
    """
    return {r.name: f"{pod_host(job, r.name, 0, settings)}:{ROLE_PORT}" for r in job.spec.pod_roles()}


def bridge_addr(job: Job, settings: BuildSettings) -> str:
    """The bridge TCPStore is hosted by the pod running actor rank 0."""
    return f"{pod_host(job, host_role(job.spec, 'actor'), 0, settings)}:{BRIDGE_PORT}"


# --- metadata --------------------------------------------------------------------------------


def owner_reference(job: Job) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def co_owner_reference(job: Job) -> dict[str, Any]:
    """The job as a further owner of an object another job controls (a `fromJob` source's claim): not the
    controller, and not blocking the owner's deletion (that needs rights on the owner's finalizers)."""
    return {**owner_reference(job), "controller": False, "blockOwnerDeletion": False}


def _metadata(job: Job, name: str, labels: dict[str, str] | None = None, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": {LABEL_JOB: job.name, LABEL_MANAGED_BY: MANAGED_BY, **(labels or {})},
    }
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def fit_label(text: str, limit: int = MAX_LABEL_LENGTH) -> str:
    """`text` when it has at most `limit` characters; else its head, '-' and 10 hex digits of its
    SHA-256, so that distinct texts stay distinct (as the names Kubernetes controllers generate)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[:limit - len(digest) - 1].rstrip('-._')}-{digest}"


def uses_kueue_pod_group(job: Job, settings: BuildSettings) -> bool:
    """The gang is a Kueue pod group: a queue is set and Volcano (whose queue it would be) is not used."""
    return bool(job.spec.scheduling.queue) and gang_scheduler(job, settings) != "volcano"


def kueue_pod_group_name(job: Job, attempt: int) -> str:
    """A label value (at most 63 characters) for any attempt number. One Kueue workload per gang attempt:
    Kueue finalizes a group once one of its pods failed. A function of the job's name and the attempt only,
    so it stays the same across an operator restart and a suspend/resume (the resumed gang is the same
    attempt and joins the group Kueue still holds admitted; tests/unit/test_planner.py checks it)."""
    return fit_label(f"{job.name}-attempt-{attempt}")


# --- pods ------------------------------------------------------------------------------------


def role_resources(role: RoleSpec) -> dict[str, Any]:
    """The role's resources with `gpus` added as nvidia.com/gpu to both requests and limits."""
    resources = copy.deepcopy(role.resources) if role.resources else {}
    if role.gpus > 0:
        for section in ("requests", "limits"):
            resources.setdefault(section, {})[GPU_RESOURCE] = str(role.gpus)
    return resources


def role_tolerations(role: RoleSpec) -> list[dict[str, Any]]:
    tolerations = copy.deepcopy(role.tolerations)
    gpu_toleration = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    if role.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append(gpu_toleration)
    return tolerations


def trainer_env(job: Job, role: RoleSpec, index: int, attempt: int, settings: BuildSettings) -> list[dict]:
    """The env contract of docs/spec.md, in its table's order."""
    addrs = role_addrs(job, settings)
    plain = {
        wire.ENV_JOB: job.name,
        wire.ENV_ROLE: role.name,
        wire.ENV_ROLE_RANK: str(index),
        wire.ENV_ROLE_REPLICAS: str(role.replicas),
        wire.ENV_PROCESSES_PER_POD: str(role.processes_per_pod),
        wire.ENV_COLOCATED_ROLES: ",".join(job.spec.colocated_into(role.name)),
        wire.ENV_CONFIG: wire.CONFIG_PATH,
        wire.ENV_ROLE_ADDRS: wire.format_role_addrs(addrs),
        wire.ENV_BRIDGE_ADDR: bridge_addr(job, settings),
        wire.ENV_CHECKPOINT_DIR: CHECKPOINT_MOUNT,
        wire.ENV_RESTART_ATTEMPT: str(attempt),
        wire.ENV_METRICS_PORT: str(settings.trainer_metrics_port),
        wire.ENV_TERMINATION_GRACE: str(job.spec.termination_grace_period_seconds),
        **SCRATCH_ENV,
    }
    env = [{"name": k, "value": v} for k, v in plain.items()]
    env.append({"name": wire.ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    if role.name == "actor":  # only actor rank 0 logs to the trackers (rlhf_trainer.trackers)
        env += tracker_secret_env(job.spec)
    return env


def tracker_secret_env(spec: JobSpec) -> list[dict[str, Any]]:
    """secretKeyRef env of the enabled trackers' credentials (spec.trackers): the key never enters the
    operator, the trainer config or the status; the trackers' client libraries read the env."""
    refs = []
    if spec.trackers.wandb.enabled and spec.trackers.wandb.api_key_secret:
        refs.append((wire.ENV_WANDB_API_KEY, spec.trackers.wandb.api_key_secret))
    if spec.trackers.mlflow.enabled and spec.trackers.mlflow.token_secret:
        refs.append((wire.ENV_MLFLOW_TRACKING_TOKEN, spec.trackers.mlflow.token_secret))
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}} for name, ref in refs]


def _container_ports(job: Job, role: RoleSpec, settings: BuildSettings) -> list[dict[str, Any]]:
    ports = [{"name": "role", "containerPort": ROLE_PORT, "protocol": "TCP"}]
    if role.name == host_role(job.spec, "actor"):
        ports.append({"name": "bridge", "containerPort": BRIDGE_PORT, "protocol": "TCP"})
    # Local rank k of the pod serves /metrics on the metrics port + k: "metrics", "metrics-1", ...
    ports += [{"name": "metrics" + (f"-{k}" if k else ""), "containerPort": settings.trainer_metrics_port + k,
               "protocol": "TCP"} for k in range(role.processes_per_pod)]
    return ports


def pod_labels(job: Job, role: RoleSpec, index: int, attempt: int, settings: BuildSettings) -> dict[str, str]:
    labels = {
        LABEL_ROLE: role.name,
        LABEL_ROLE_INDEX: str(index),
        LABEL_RESTART_ATTEMPT: str(attempt),
    }
    scheduler = gang_scheduler(job, settings)
    if scheduler == "coscheduling":
        labels[LABEL_COSCHEDULING_GROUP] = job.name
    # With Volcano the queue is a Volcano queue (on the PodGroup), not a Kueue LocalQueue.
    if uses_kueue_pod_group(job, settings):
        labels[LABEL_KUEUE_QUEUE] = job.spec.scheduling.queue
        labels[LABEL_KUEUE_POD_GROUP] = kueue_pod_group_name(job, attempt)
    return labels


def pod_annotations(job: Job, settings: BuildSettings) -> dict[str, str]:
    annotations = {}
    scheduler = gang_scheduler(job, settings)
    if scheduler == "volcano":
        annotations[ANNOTATION_VOLCANO_GROUP] = job.name
    if job.spec.scheduling.queue and scheduler != "volcano":
        annotations[ANNOTATION_KUEUE_POD_GROUP_TOTAL] = str(len(gang_pod_names(job)))
    return annotations


def source_volumes(sources: Mapping[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) for `fromJob` sources {source job: its checkpoint claim}: the claim
    read-only, only its export folder (subPath) at source_model_path(job)."""
    volumes, mounts = [], []
    for job_name, claim in sources.items():
        name = f"source-{job_name}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": source_model_path(job_name), "subPath": EXPORT_DIR,
                       "readOnly": True})
    return volumes, mounts


def pvc_source_volumes(spec: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) of the pvc:// sources: each claim once, read-only; each (claim, subPath)
    mounted at srcs.pvc_mount_path()."""
    refs = [ref for _, ref, _ in spec.source_fields() if ref.kind == "pvc"]
    claims = list(dict.fromkeys(ref.location for ref in refs))
    volumes = [{"name": f"source-pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
               for i, claim in enumerate(claims)]
    mounts = []
    for ref in dict.fromkeys(refs):
        mount = {"name": f"source-pvc-{claims.index(ref.location)}", "mountPath": srcs.pvc_mount_path(ref),
                 "readOnly": True}
        mounts.append({**mount, "subPath": ref.inner} if ref.inner else mount)
    return volumes, mounts


def remote_sources(spec: JobSpec) -> list[tuple[str, srcs.SourceRef]]:
    """[(repo type, ref)] of the hf:// and s3:// sources the initializer fetches."""
    return [(repo_type, ref) for _, ref, repo_type in spec.source_fields() if ref.remote]


def source_cache_mount() -> dict[str, Any]:
    """The job's source cache in the trainer containers: the folder `sources` of its checkpoint volume,
    read-only (the initializer writes it through the volume's own mount, srcs.INITIALIZER_CACHE)."""
    return {"name": "checkpoints", "mountPath": srcs.FETCH_MOUNT, "subPath": srcs.CACHE_SUBDIR, "readOnly": True}


def source_secret_env(spec: JobSpec) -> list[dict[str, Any]]:
    """The initializer's env: HF_TOKEN, the S3 keys and the optional S3 session token as secretKeyRefs
    (never read by the operator), the S3 endpoint and region as values."""
    env: list[dict[str, Any]] = []
    token = spec.sources.hf_token_secret
    if token:
        env.append({"name": srcs.ENV_HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    s3 = spec.sources.s3
    if s3.credentials_secret:
        env += [{"name": name, "valueFrom": {"secretKeyRef": {"name": s3.credentials_secret, "key": name}}}
                for name in (srcs.ENV_S3_ACCESS_KEY_ID, srcs.ENV_S3_SECRET_ACCESS_KEY)]
        # Temporary (STS) credentials carry a session token; long-lived keys have none: optional.
        env.append({"name": srcs.ENV_S3_SESSION_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": s3.credentials_secret, "key": srcs.ENV_S3_SESSION_TOKEN, "optional": True}}})
    env += [{"name": name, "value": value} for name, value in
            ((srcs.ENV_S3_ENDPOINT, s3.endpoint), (srcs.ENV_S3_REGION, s3.region)) if value]
    return env


def initializer_container(job: Job, role: RoleSpec, fetch: bool) -> dict[str, Any] | None:
    """The init container that fetches the job's remote sources (fetch: the gang's first pod) or waits
    for that fetch (every other pod); None when the job names no remote source."""
    remote = remote_sources(job.spec)
    if not remote:
        return None
    return {
        "name": srcs.INITIALIZER_CONTAINER,
        "image": role.image or job.spec.image,
        "imagePullPolicy": job.spec.image_pull_policy,
        "command": [*srcs.INITIALIZER_COMMAND, *srcs.initializer_args(remote, wait=not fetch)],
        "env": [{"name": k, "value": v} for k, v in SCRATCH_ENV.items()] + source_secret_env(job.spec),
        "resources": role_resources(role),
        "volumeMounts": [{"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
                         {"name": "tmp", "mountPath": SCRATCH_MOUNT}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True},
    }


def build_role_pod(job: Job, role: RoleSpec, index: int, attempt: int, settings: BuildSettings,
                   sources: Mapping[str, str] | None = None) -> dict:
    """Pod `<job>-<role>-<index>` of gang attempt `attempt`; `sources`: {fromJob source: its claim}. Path
    sources (pvc://, hf://, s3://) are mounted read-only; remote ones come from the initializer."""
    extra_volumes, extra_mounts = source_volumes(sources or {})
    pvc_volumes, pvc_mounts = pvc_source_volumes(job.spec)
    extra_volumes += pvc_volumes
    extra_mounts += pvc_mounts
    name = pod_name(job.name, role.name, index)
    init = initializer_container(job, role, fetch=name == gang_pod_names(job)[0])
    if init:
        extra_mounts.append(source_cache_mount())
    metadata = _metadata(job, name, pod_labels(job, role, index, attempt, settings))
    annotations = pod_annotations(job, settings)
    if annotations:
        metadata["annotations"] = annotations
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": role.image or job.spec.image,
        "imagePullPolicy": job.spec.image_pull_policy,
        "command": list(TRAINER_COMMAND),
        "env": trainer_env(job, role, index, attempt, settings),
        "ports": _container_ports(job, role, settings),
        "resources": role_resources(role),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": SCRATCH_MOUNT},
            *extra_mounts,
        ],
        # The trainer writes a permanent error's message to /dev/termination-log; logs otherwise.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }
    spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": job.name,
        "restartPolicy": "Never",
        # SIGTERM to SIGKILL: the trainer saves a last checkpoint in it when one fits.
        "terminationGracePeriodSeconds": job.spec.termination_grace_period_seconds,
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": False,
        # Trainer pods need no service env vars; a namespace with many services would flood them.
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        **({"initContainers": [init]} if init else {}),
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job.name)}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoint_claim_name(job)}},
            {"name": "dshm", "emptyDir": shared_memory(job, role)},
            {"name": "tmp", "emptyDir": {}},
            *extra_volumes,
        ],
    }
    if role.node_selector:
        spec["nodeSelector"] = dict(role.node_selector)
    tolerations = role_tolerations(role)
    if tolerations:
        spec["tolerations"] = tolerations
    scheduler = gang_scheduler(job, settings)
    if scheduler == "volcano":
        spec["schedulerName"] = "volcano"
    elif scheduler == "coscheduling":
        spec["schedulerName"] = settings.coscheduling_scheduler_name
    if job.spec.scheduling.priority_class_name:
        spec["priorityClassName"] = job.spec.scheduling.priority_class_name
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    # The platform's additions (podtemplate.py): the job's template, then the role's; the gang
    # scheduler's schedulerName stays whatever they say.
    keep = {"schedulerName": spec["schedulerName"]} if "schedulerName" in spec else {}
    for template in (job.spec.pod_template, role.pod_template):
        pod = apply_pod_template(pod, template, keep=keep)
    return pod


def shared_memory(job: Job, role: RoleSpec) -> dict[str, str]:
    """The /dev/shm emptyDir: in memory, limited to the role's (else the job's) sharedMemorySize."""
    size = role.shared_memory_size or job.spec.shared_memory_size
    return {"medium": "Memory", **({"sizeLimit": size} if size else {})}


def build_gang(job: Job, attempt: int, settings: BuildSettings,
               sources: Mapping[str, str] | None = None) -> list[dict]:
    """Every pod of the gang: each role without colocateWith, replicas pods each; every pod mounts the
    `fromJob` sources {source job: its checkpoint claim} (status.sources, recorded by the planner)."""
    return [
        build_role_pod(job, role, index, attempt, settings, sources)
        for role in job.spec.pod_roles()
        for index in range(role.replicas)
    ]


# --- support objects -------------------------------------------------------------------------


def build_service(job: Job) -> dict:
    """Headless Service `<job>`: gives each pod the DNS name `<pod>.<job>.<ns>.svc`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, job.name),
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.name},
            "ports": [
                {"name": "role", "port": ROLE_PORT, "targetPort": ROLE_PORT, "protocol": "TCP"},
                {"name": "bridge", "port": BRIDGE_PORT, "targetPort": BRIDGE_PORT, "protocol": "TCP"},
            ],
        },
    }


def build_config_map(job: Job) -> dict:
    """ConfigMap `<job>-config` holding the trainer config, mounted at /etc/rlhf."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name)),
        "data": {CONFIG_FILE: dump_config(build_trainer_config(job))},
    }


def rollout_hash(job: Job, settings: BuildSettings) -> str:
    """A digest of what a gang is built from: the trainer config and the pod templates (as gang attempt 0).
    Two specs with the same digest need no rollout; an edit that changes it restarts the gang."""
    parts = [dump_config(build_trainer_config(job)), build_gang(job, 0, settings)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_pvc(job: Job) -> dict | None:
    """PVC `<job>-checkpoints`, or None when the job mounts an existing claim.

    A retained claim has no owner reference, so it outlives the job (and a job re-created with
    the same name resumes from it).
    """
    volume = job.spec.checkpoint.volume
    if volume.existing_claim:
        return None
    spec: dict[str, Any] = {
        "accessModes": [CHECKPOINT_ACCESS_MODE],
        "resources": {"requests": {"storage": volume.size}},
    }
    if volume.storage_class_name:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(job, pvc_name(job.name), owned=not volume.retain),
        "spec": spec,
    }


def build_pod_group(job: Job, settings: BuildSettings) -> dict | None:
    """PodGroup `<job>` for the gang scheduler; None when the scheduler is none."""
    scheduler = gang_scheduler(job, settings)
    if scheduler == "none":
        return None
    scheduling = job.spec.scheduling
    spec: dict[str, Any] = {
        "minMember": len(gang_pod_names(job)),
        "minResources": gang_min_resources(job),
    }
    if scheduler == "volcano":
        api_version = VOLCANO_API_VERSION
        if scheduling.queue:
            spec["queue"] = scheduling.queue
        if scheduling.priority_class_name:
            spec["priorityClassName"] = scheduling.priority_class_name
    elif scheduler == "coscheduling":
        api_version = COSCHEDULING_API_VERSION
        spec["scheduleTimeoutSeconds"] = scheduling.gang_timeout_seconds
    else:
        raise ValueError(f"spec.scheduling.gangScheduler: unknown gang scheduler {scheduler!r}")
    return {"apiVersion": api_version, "kind": "PodGroup", "metadata": _metadata(job, job.name), "spec": spec}


def build_support_objects(job: Job, settings: BuildSettings) -> list[dict]:
    """The non-pod children: Service, ConfigMap, PVC (unless existingClaim), PodGroup (if gang)."""
    objects = [build_service(job), build_config_map(job), build_pvc(job), build_pod_group(job, settings)]
    return [obj for obj in objects if obj is not None]


def support_object_refs(job: Job, settings: BuildSettings) -> list[tuple[str, str]]:
    """(kind, name) of each object build_support_objects() returns, without building them
    (the planner checks these every pass; rendering the config each time is wasted work)."""
    refs = [("Service", job.name), ("ConfigMap", config_map_name(job.name))]
    if not job.spec.checkpoint.volume.existing_claim:
        refs.append(("PersistentVolumeClaim", pvc_name(job.name)))
    if gang_scheduler(job, settings) != "none":
        refs.append(("PodGroup", job.name))
    return refs


# --- resource quantities (PodGroup.minResources) ---------------------------------------------

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1,
                     "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_quantity(text: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3", 4) as an exact number."""
    raw = str(text).strip()
    units = {**_BINARY_SUFFIXES, **_DECIMAL_SUFFIXES}
    # Two-letter binary suffixes are tried before one-letter decimal ones ("Mi" before "M").
    suffix = next((s for s in units if s and raw.endswith(s)), "")
    number, factor = raw[: len(raw) - len(suffix)], units[suffix]
    try:
        return Fraction(number) * factor
    except ValueError:
        raise ValueError(f"resource quantity {text!r} is not a number with a unit (e.g. 500m, 2Gi)") from None


def format_quantity(value: Fraction) -> str:
    """The shortest exact spelling: "4Gi", "1500m", "3"."""
    if value.denominator != 1:
        milli = value * 1000
        if milli.denominator == 1:
            return f"{milli.numerator}m"
        return str(float(value))
    whole = value.numerator
    if whole:
        for suffix, factor in reversed(_BINARY_SUFFIXES.items()):
            if whole % factor == 0:
                return f"{whole // factor}{suffix}"
    return str(whole)


def gang_min_resources(job: Job) -> dict[str, str]:
    """Sum of the effective requests of every gang pod (a request defaults to its limit)."""
    totals: dict[str, Fraction] = {}
    for role in job.spec.pod_roles():
        resources = role_resources(role)
        effective = {**resources.get("limits", {}), **resources.get("requests", {})}
        for name, quantity in effective.items():
            totals[name] = totals.get(name, Fraction(0)) + parse_quantity(quantity) * role.replicas
    return {name: format_quantity(total) for name, total in sorted(totals.items())}
