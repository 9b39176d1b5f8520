"""Pod template overrides (issue 18, part 1): what a platform adds to the pods the operator builds.

    spec.podTemplate           every pod of the job
    spec.roles[].podTemplate   the role's pods, applied after the job's

Each is a Kubernetes PodTemplateSpec cut to what a platform needs (as Kubeflow Trainer's pod template
overrides and JobSet's pod templates): metadata labels and annotations, and in `spec` serviceAccountName,
automountServiceAccountToken, imagePullSecrets, nodeSelector, affinity, tolerations,
topologySpreadConstraints, runtimeClassName, schedulerName, securityContext, volumes, initContainers and
containers (the one named `trainer` adds env, envFrom, volumeMounts and a securityContext to the trainer
container; any other is a sidecar). The API server validates the Kubernetes types themselves when the
pods are created (a refusal fails the job as ChildRejected with its message).

Merge rule (Kubernetes' strategic merge, as `kubectl patch` applies it): maps merge key by key and the
template wins; lists of named things merge by their patch merge key (containers, initContainers, volumes,
imagePullSecrets and env by `name`, volumeMounts by `mountPath`): an item with a new key is appended, one
with a known key is merged into it; tolerations, topologySpreadConstraints and envFrom are appended to the
operator's (they have no merge key; appending keeps the role's tolerations and the GPU toleration); any
other value is replaced.

What the operator must own is refused, naming the field (the CRD's CEL rules say the same): the trainer's
image, command, args, ports and resources (spec.image, roles[].resources); RLHF_* and POD_IP env; the
config, checkpoint, /dev/shm and /tmp mounts and their volumes; the labels and annotations the operator
and the gang schedulers key on; priorityClassName (scheduling.priorityClassName says it once). A
schedulerName is refused when scheduling.gangScheduler names a gang scheduler (its scheduler must place
the gang); with the operator's default gang scheduler, the gang scheduler's name is kept.

Security defaults (non-root uid 1000, read-only root filesystem, no privilege escalation, all capabilities
dropped, RuntimeDefault seccomp, no service account token) stay unless a template's securityContext or
automountServiceAccountToken changes them: docs/spec.md says what each change gives up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from rlhf_contract import wire

# The fields a template's pod spec may set (anything else is an unknown field).
SPEC_FIELDS = ("serviceAccountName", "automountServiceAccountToken", "imagePullSecrets", "nodeSelector", "affinity",
               "tolerations", "topologySpreadConstraints", "runtimeClassName", "schedulerName", "securityContext",
               "volumes", "initContainers", "containers")
# What the `trainer` container entry may add to the trainer container.
TRAINER_FIELDS = ("name", "env", "envFrom", "volumeMounts", "securityContext")
# Labels and annotations the operator and the gang schedulers read: a template may not set them.
OWNED_LABEL_PREFIXES = ("rlhf.dev/", "kueue.x-k8s.io/")
OWNED_LABELS = ("scheduling.x-k8s.io/pod-group", "app.kubernetes.io/managed-by")
OWNED_ANNOTATION_PREFIXES = ("kueue.x-k8s.io/",)
OWNED_ANNOTATIONS = ("scheduling.k8s.io/group-name",)
# The trainer's own volumes and mounts (builders.build_role_pod).
OWNED_VOLUMES = ("config", "checkpoints", "dshm", "tmp")
OWNED_MOUNTS = (wire.CONFIG_MOUNT, wire.CHECKPOINT_MOUNT, "/dev/shm", "/tmp")
OWNED_ENV = ("POD_IP",)
OWNED_ENV_PREFIX = "RLHF_"
# Strategic merge: the patch merge key of each list of named things, and the lists that are appended.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "imagePullSecrets": "name",
              "env": "name", "volumeMounts": "mountPath"}
APPENDED = ("tolerations", "topologySpreadConstraints", "envFrom")
# Bounds (the CRD declares the same, which keeps its CEL rules within the API server's cost budget).
MAX_ITEMS = {"containers": 16, "initContainers": 16, "volumes": 64, "imagePullSecrets": 16, "tolerations": 64,
             "topologySpreadConstraints": 16, "env": 256, "envFrom": 32, "volumeMounts": 64}
MAX_METADATA_ENTRIES = 64


@dataclass(frozen=True)
class PodTemplate:
    """A parsed podTemplate: labels and annotations for the pods' metadata, `spec` to merge into theirs."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def parse_pod_template(raw: Any, path: str) -> tuple[PodTemplate, list[tuple[str, str]]]:
    """A manifest's podTemplate -> (PodTemplate, [(field path, message)]). `path` is the template's own
    (`podTemplate`, `roles[1].podTemplate`); every problem is named at once."""
    errors: list[tuple[str, str]] = []
    if raw is None:
        return PodTemplate(), errors
    if not isinstance(raw, dict):
        return PodTemplate(), [(path, f"must be an object, got {_kind(raw)}")]
    errors += [(f"{path}.{k}", "unknown field (known fields: metadata, spec)") for k in raw if k not in ("metadata", "spec")]
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        errors.append((f"{path}.metadata", f"must be an object, got {_kind(meta)}"))
        meta = {}
    errors += [(f"{path}.metadata.{k}", "unknown field (known fields: annotations, labels)")
               for k in meta if k not in ("labels", "annotations")]
    labels = _string_map(meta.get("labels"), f"{path}.metadata.labels", errors)
    annotations = _string_map(meta.get("annotations"), f"{path}.metadata.annotations", errors)
    errors += [(f"{path}.metadata.labels.{k}", "is set by the operator or a gang scheduler: a template may not set it")
               for k in labels if k.startswith(OWNED_LABEL_PREFIXES) or k in OWNED_LABELS]
    errors += [(f"{path}.metadata.annotations.{k}",
                "is set by the operator or a gang scheduler: a template may not set it")
               for k in annotations if k.startswith(OWNED_ANNOTATION_PREFIXES) or k in OWNED_ANNOTATIONS]
    spec = raw.get("spec") or {}
    if not isinstance(spec, dict):
        errors.append((f"{path}.spec", f"must be an object, got {_kind(spec)}"))
        spec = {}
    errors += _spec_errors(spec, f"{path}.spec")
    return PodTemplate(labels, annotations, copy.deepcopy(spec)), errors


def _string_map(value: Any, path: str, errors: list[tuple[str, str]]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append((path, f"must be an object, got {_kind(value)}"))
        return {}
    errors += [(f"{path}.{k}", f"must be a string, got {_kind(v)}") for k, v in value.items() if not isinstance(v, str)]
    if len(value) > MAX_METADATA_ENTRIES:
        errors.append((path, f"must have at most {MAX_METADATA_ENTRIES} entries (got {len(value)})"))
    return {k: v for k, v in value.items() if isinstance(v, str)}


def _spec_errors(spec: dict[str, Any], path: str) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for key in spec:
        if key == "priorityClassName":
            errors.append((f"{path}.{key}", "is set by scheduling.priorityClassName: set it there"))
        elif key not in SPEC_FIELDS:
            errors.append((f"{path}.{key}", f"unknown field (known fields: {', '.join(sorted(SPEC_FIELDS))})"))
    for key, limit in MAX_ITEMS.items():
        value = spec.get(key)
        if value is not None and not isinstance(value, list):
            errors.append((f"{path}.{key}", f"must be an array, got {_kind(value)}"))
        elif value is not None and len(value) > limit:
            errors.append((f"{path}.{key}", f"must have at most {limit} items (got {len(value)})"))
    for key in ("nodeSelector", "affinity", "securityContext"):
        if key in spec and not isinstance(spec[key], dict):
            errors.append((f"{path}.{key}", f"must be an object, got {_kind(spec[key])}"))
    for i, volume in enumerate(_items(spec, "volumes")):
        if volume.get("name") in OWNED_VOLUMES:
            errors.append((f"{path}.volumes[{i}].name", f"{volume['name']!r} is a volume of the operator's "
                                                         f"(its own: {', '.join(OWNED_VOLUMES)})"))
    for i, container in enumerate(_items(spec, "initContainers")):
        if container.get("name") == wire.CONTAINER_NAME:
            errors.append((f"{path}.initContainers[{i}].name", f"{wire.CONTAINER_NAME!r} is the trainer container"))
    for i, container in enumerate(_items(spec, "containers")):
        at = f"{path}.containers[{i}]"
        if not isinstance(container.get("name"), str) or not container["name"]:
            errors.append((f"{at}.name", "is required"))
        elif container["name"] == wire.CONTAINER_NAME:
            errors += _trainer_errors(container, at)
        elif "image" not in container:
            errors.append((f"{at}.image", "is required for a sidecar (a container other than the trainer)"))
    return errors


def _items(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key)
    return [item if isinstance(item, dict) else {} for item in value] if isinstance(value, list) else []


def _trainer_errors(container: dict[str, Any], at: str) -> list[tuple[str, str]]:
    errors = [(f"{at}.{k}", "is the operator's: the trainer container takes only env, envFrom, volumeMounts and "
                            "securityContext from a template (image: spec.image or roles[].image; resources: "
                            "roles[].resources)")
              for k in container if k not in TRAINER_FIELDS]
    for j, var in enumerate(_items(container, "env")):
        name = var.get("name", "")
        if isinstance(name, str) and (name.startswith(OWNED_ENV_PREFIX) or name in OWNED_ENV):
            errors.append((f"{at}.env[{j}].name", f"{name!r} is part of the operator <-> trainer contract "
                                                   f"(RLHF_* and POD_IP are set by the operator)"))
    for j, mount in enumerate(_items(container, "volumeMounts")):
        if str(mount.get("mountPath", "")).rstrip("/") in OWNED_MOUNTS or mount.get("name") in OWNED_VOLUMES:
            errors.append((f"{at}.volumeMounts[{j}]", f"mounts over the operator's {mount.get('mountPath')!r} or "
                                                      f"{mount.get('name')!r} (its own: {', '.join(OWNED_MOUNTS)})"))
    return errors


# --- the merge ---------------------------------------------------------------------------------------


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """`patch` merged into `base` (neither is changed) by the rule of the module docstring; `key` is the
    field the two values are under (it decides how lists merge)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        if key in APPENDED:
            return copy.deepcopy(base) + copy.deepcopy(patch)
        merge_key = MERGE_KEYS.get(key)
        if merge_key is not None:
            out = copy.deepcopy(base)
            for item in patch:
                at = next((i for i, old in enumerate(out) if isinstance(old, dict) and isinstance(item, dict)
                           and old.get(merge_key) == item.get(merge_key)), None)
                if at is None:
                    out.append(copy.deepcopy(item))
                else:
                    out[at] = strategic_merge(out[at], item)
            return out
    return copy.deepcopy(patch)


def apply_pod_template(pod: dict[str, Any], template: PodTemplate, *, keep: dict[str, Any]) -> dict[str, Any]:
    """The pod with the template merged in. `keep`: pod spec fields the operator must hold whatever the
    template says (the gang scheduler's schedulerName), written back after the merge."""
    if template == PodTemplate():
        return pod
    out = copy.deepcopy(pod)
    meta = out["metadata"]
    # parse_pod_template refused the keys the operator sets: a later template wins over an earlier one.
    meta["labels"] = {**meta.get("labels", {}), **template.labels}
    if template.annotations:
        meta["annotations"] = {**meta.get("annotations", {}), **template.annotations}
    out["spec"] = strategic_merge(out["spec"], template.spec)
    out["spec"].update(keep)
    return out
