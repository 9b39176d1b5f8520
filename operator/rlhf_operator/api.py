"""The typed RLHFJob: spec and status dataclasses, and parse_spec() (docs/spec.md).

parse_spec() enforces the same rules as the CRD's schema and CEL rules, so the local runner (which
has no API server) rejects exactly what a cluster rejects, with every bad field named at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rlhf_contract import layout
from rlhf_contract.algorithms import (
    ALGORITHMS,
    FROZEN_ROLES,
    NAMES,
    ONLINE,
    ROLE_NAMES,
    TRAINED_ROLES,
    role_set_problem,
)
from rlhf_contract.config import (
    CALLABLE_PATTERN,
    REWARD_RULES,
    CheckpointConfig,
    DatasetConfig,
    DeepSpeedConfig,
    Hyperparameters,
    ModelConfig,
    RewardConfig,
    RoleConfig,
    dataset_format_problem,
)
from rlhf_contract.knobs import Knob, Setting, settings_of

GANG_SCHEDULERS = ("volcano", "coscheduling", "none")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
PHASES = ("Pending", "Creating", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, kw_only=True)
class RoleSpec(RoleConfig):
    """A role as the manifest writes it: its placement and DeepSpeed settings (shared with the trainer
    config) plus what only Kubernetes needs."""

    name: str
    image: str = ""
    gpus: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class VolumeSpec:
    size: str = "10Gi"
    storage_class_name: str = ""
    existing_claim: str = ""
    retain: bool = True


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec(CheckpointConfig):
    """The trainer's checkpoint settings plus the volume they live on."""

    volume: VolumeSpec = field(default_factory=VolumeSpec)


@dataclass(frozen=True)
class SchedulingSpec:
    gang_scheduler: str = ""  # "" = the operator's default (settings)
    queue: str = ""
    priority_class_name: str = ""
    gang_timeout_seconds: int = 300


@dataclass(frozen=True)
class FailurePolicy:
    max_restarts: int = 3
    backoff_seconds: int = 10


@dataclass(frozen=True)
class JobSpec:
    algorithm: str
    image: str
    model: ModelConfig
    dataset: DatasetConfig
    roles: tuple[RoleSpec, ...]
    image_pull_policy: str = "IfNotPresent"
    reward_model: ModelConfig | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    scheduling: SchedulingSpec = field(default_factory=SchedulingSpec)
    failure_policy: FailurePolicy = field(default_factory=FailurePolicy)
    suspend: bool = False
    active_deadline_seconds: int = 0
    ttl_seconds_after_finished: int = 0

    def role(self, name: str) -> RoleSpec:
        return next(r for r in self.roles if r.name == name)

    def placements(self) -> dict[str, layout.Placement]:
        return {r.name: layout.Placement(r.replicas, r.colocate_with) for r in self.roles}

    def pod_roles(self) -> tuple[RoleSpec, ...]:
        """Roles that get pods of their own (colocated roles run inside their host's pods)."""
        return tuple(r for r in self.roles if not r.colocate_with)

    def colocated_into(self, host: str) -> tuple[str, ...]:
        return layout.colocated_into(self.placements(), host)


@dataclass(frozen=True)
class Job:
    """What the planner and builders need of an RLHFJob object: identity, spec, and status."""

    name: str
    namespace: str
    uid: str
    generation: int
    creation_timestamp: str
    spec: JobSpec
    status: dict[str, Any] = field(default_factory=dict)


class SpecError(ValueError):
    """Every problem of a spec at once; each entry is (field path, message).

    Paths are relative to `spec` (`roles[1].replicas`), except `metadata.*` from parse_job().
    """

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{_qualified(path)}: {msg}" for path, msg in errors))


def _qualified(path: str) -> str:
    return path if path.startswith("metadata.") else f"spec.{path}"




# ---------------------------------------------------------------------------------------------
# Parsing. The fields shared with the trainer are read from their rlhf_contract dataclasses (bounds,
# enums, defaults); the CRD's schema for them is generated from the same (scripts/gen_contract.py).
# The Kubernetes fields' rules below each have a twin in crds/rlhfjobs.yaml (schema keyword or CEL
# rule); tests/unit/test_crd.py runs both over the same cases and checks that they agree.

# Pod names `<job>-<role>-<index>` are hostnames (at most 63 characters): 50 leaves room for
# "-reference-" and a two-digit index (the CRD's root rule says the same).
MAX_JOB_NAME_LENGTH = 50
DEFAULT_VOLUME_SIZE = VolumeSpec.size
# Kubernetes resource.Quantity syntax (the CRD uses the same pattern on checkpoint.volume.size).
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_MISSING = object()


def _kind(value: Any) -> str:
    """The JSON type name of a value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _one_of(allowed: tuple[str, ...]) -> str:
    return "must be one of: " + ", ".join(allowed)


class _Fields:
    """Reads one manifest object: collects every problem into `errors`, remembers the keys read so
    that the rest can be reported as unknown (kubectl's default strict field validation)."""

    def __init__(self, raw: Any, path: str, errors: list[tuple[str, str]]):
        self.path, self.errors, self.read = path, errors, set()
        # A non-object is one error; its fields are then not also "required".
        self.wrong_type = raw is not None and not isinstance(raw, dict)
        if self.wrong_type:
            self.error("", f"must be an object, got {_kind(raw)}")
            raw = None
        self.raw: dict[str, Any] = raw or {}

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def error(self, key: str, message: str) -> None:
        self.errors.append((self.at(key), message))

    def has(self, key: str) -> bool:
        # The API server prunes nulls of non-nullable fields before defaulting: null == unset.
        return self.raw.get(key) is not None

    def _value(self, key: str, required: bool) -> Any:
        self.read.add(key)
        value = self.raw.get(key)
        if value is None:
            if required and not self.wrong_type:
                self.error(key, "is required")
            return _MISSING
        return value

    def obj(self, key: str) -> _Fields:
        self.read.add(key)
        return _Fields(self.raw.get(key), self.at(key), self.errors)

    def string(self, key: str, default: str = "", *, required: bool = False, enum: tuple[str, ...] = (),
               pattern: str = "", max_length: int = 0) -> str:
        value = self._value(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {_kind(value)}")
            return default
        if required and not value:
            self.error(key, "must not be empty")
        elif self._valid(key, value, Knob("", enum=enum, max_length=max_length)) and pattern \
                and not re.match(pattern, value):
            self.error(key, f"must match {pattern} (got {value!r})")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be a boolean, got {_kind(value)}")
            return default
        return value

    def integer(self, key: str, default: int, **bounds: Any) -> int:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 3.0 is the integer 3
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be an integer, got {_kind(value)}")
            return default
        return value if self._valid(key, value, Knob("", **bounds)) else default

    def number(self, key: str, default: float, **bounds: Any) -> float:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"must be a number, got {_kind(value)}")
            return default
        return float(value) if self._valid(key, value, Knob("", **bounds)) else default

    def _valid(self, key: str, value: Any, knob: Knob) -> bool:
        problems = knob.problems(value)
        for problem in problems:
            self.error(key, problem)
        return not problems

    def setting(self, s: Setting, default: Any = _MISSING) -> Any:
        """A field shared with the trainer, by its camelCase name, with its knob's rules."""
        default = s.default if default is _MISSING else default
        k = s.knob
        if s.type is str:
            return self.string(s.camel, "" if s.required else default, required=s.required, enum=k.enum,
                               max_length=k.max_length)
        if s.type is bool:
            return self.boolean(s.camel, default)
        read = self.integer if s.type is int else self.number
        return read(s.camel, default, minimum=k.minimum, maximum=k.maximum, gt=k.gt, lt=k.lt, rule=k.rule)

    def settings(self, cls: type, **defaults: Any) -> dict[str, Any]:
        """Every knob of a contract dataclass (`defaults` overrides some defaults), as constructor kwargs."""
        return {s.name: self.setting(s, defaults.get(s.name, _MISSING)) for s in settings_of(cls)}

    def array(self, key: str, *, required: bool = False) -> list[Any]:
        value = self._value(key, required)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            self.error(key, f"must be an array, got {_kind(value)}")
            return []
        return value

    def string_map(self, key: str, *, int_values: bool = False) -> dict[str, Any]:
        """A map of strings (nodeSelector), or of quantities (int-or-string) when int_values."""
        value = self._value(key, False)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self.error(key, f"must be an object, got {_kind(value)}")
            return {}
        allowed = (str, int) if int_values else (str,)
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, allowed):
                expected = "a string or an integer" if int_values else "a string"
                self.error(f"{key}.{k}", f"must be {expected}, got {_kind(v)}")
        return dict(value)

    def done(self) -> None:
        """Report every key that was never read: an unknown field."""
        known = ", ".join(sorted(self.read))
        for key in self.raw:
            if key not in self.read:
                self.error(key, f"unknown field (known fields: {known})")


def parse_spec(spec: dict[str, Any]) -> JobSpec:
    """Validate a raw `spec` dict (camelCase, as in the manifest) and return a JobSpec.

    Raises SpecError listing every bad field by path (e.g. `roles[1].replicas`) with the allowed
    values, applying the same defaults, enums, minimums and CEL rules as crds/rlhfjobs.yaml.
    """
    errors: list[tuple[str, str]] = []
    top = _Fields(spec, "", errors)
    algorithm = top.string("algorithm", required=True, enum=NAMES)
    image = top.string("image", required=True)
    pull_policy = top.string("imagePullPolicy", JobSpec.image_pull_policy, enum=PULL_POLICIES)
    model = _settings(top.obj("model"), ModelConfig) if _present(top, "model") else ModelConfig(path="")
    top.read.add("rewardModel")  # known even when null
    reward_model = _settings(top.obj("rewardModel"), ModelConfig) if top.has("rewardModel") else None
    reward = _reward(top.obj("reward"))
    dataset = _settings(top.obj("dataset"), DatasetConfig) if _present(top, "dataset") else DatasetConfig(path="")
    raw_roles = top.array("roles", required=True)
    roles_given = isinstance(top.raw.get("roles"), list)
    if roles_given and not 1 <= len(raw_roles) <= len(ROLE_NAMES):
        top.error("roles", f"must have 1 to {len(ROLE_NAMES)} roles (got {len(raw_roles)})")
    roles = tuple(_role(_Fields(raw, f"roles[{i}]", errors)) for i, raw in enumerate(raw_roles))
    hyperparameters = _settings(top.obj("hyperparameters"), Hyperparameters)
    checkpoint = _checkpoint(top.obj("checkpoint"))
    scheduling = _scheduling(top.obj("scheduling"))
    failure = top.obj("failurePolicy")
    failure_policy = FailurePolicy(
        max_restarts=failure.integer("maxRestarts", FailurePolicy.max_restarts, minimum=0),
        backoff_seconds=failure.integer("backoffSeconds", FailurePolicy.backoff_seconds, minimum=1),
    )
    failure.done()
    suspend = top.boolean("suspend", JobSpec.suspend)
    deadline = top.integer("activeDeadlineSeconds", JobSpec.active_deadline_seconds, minimum=0)
    ttl = top.integer("ttlSecondsAfterFinished", JobSpec.ttl_seconds_after_finished, minimum=0)
    top.done()

    # Cross-field rules read only fields that parsed cleanly (a bad field already has its error).
    bad = {path for path, _ in errors}
    errors.extend(_duplicate_role_errors(roles))
    if algorithm in ALGORITHMS and roles_given:
        problem = role_set_problem(algorithm, reward.type, [r.name for r in roles if r.name in ROLE_NAMES])
        if problem:
            errors.append(("roles", problem))
    placed = [(r.name, layout.Placement(r.replicas, r.colocate_with)) for r in roles]
    errors.extend((f"roles[{i}].colocateWith", problem) for i, problem in layout.colocation_problems(placed))
    if algorithm in ALGORITHMS and ALGORITHMS[algorithm].needs_reward_model(reward.type) and reward_model is None:
        errors.append(("rewardModel", f"is required when reward.type is model (algorithms {', '.join(ONLINE)})"))
    errors.extend(_gang_shape_errors(roles, placed, hyperparameters.batch_size, bad))
    errors.extend(_offload_errors(roles, bad))
    if algorithm in ALGORITHMS and dataset.path and "dataset.format" not in bad:
        problem = dataset_format_problem(algorithm, dataset)
        if problem:
            errors.append(("dataset.format", problem))
    if errors:
        raise SpecError(errors)
    return JobSpec(
        algorithm=algorithm, image=image, model=model, dataset=dataset, roles=roles,
        image_pull_policy=pull_policy, reward_model=reward_model, reward=reward,
        hyperparameters=hyperparameters, checkpoint=checkpoint, scheduling=scheduling,
        failure_policy=failure_policy, suspend=suspend, active_deadline_seconds=deadline,
        ttl_seconds_after_finished=ttl,
    )


def _present(fields: _Fields, key: str) -> bool:
    """A required object: report it once when missing (not again for each of its fields)."""
    fields.read.add(key)
    if not fields.has(key):
        fields.error(key, "is required")
    return fields.has(key)


def _settings(fields: _Fields, cls: type, **defaults: Any) -> Any:
    """A section made only of contract knobs (model, dataset, hyperparameters): read, then unknown keys."""
    value = cls(**fields.settings(cls, **defaults))
    fields.done()
    return value


def _reward(fields: _Fields) -> RewardConfig:
    reward = _settings(fields, RewardConfig)
    if reward.type == "rule" and not reward.rule:
        fields.error("rule", f"is required when type is rule; {_one_of(REWARD_RULES)}")
    if reward.rule == "regex" and not reward.pattern:
        fields.error("pattern", "is required when rule is regex")
    if reward.rule == "callable" and not re.match(CALLABLE_PATTERN, reward.callable):
        fields.error("callable", f'must be "module:function" when rule is callable (got {reward.callable!r})')
    return reward


def _role(fields: _Fields) -> RoleSpec:
    name = fields.string("name", required=True, enum=ROLE_NAMES)
    # Roles that hold no optimizer default to ZeRO stage 0 (the CRD leaves zeroStage unset).
    zero_stage = 0 if name in FROZEN_ROLES else DeepSpeedConfig.zero_stage
    deepspeed = _settings(fields.obj("deepspeed"), DeepSpeedConfig, zero_stage=zero_stage)
    role = RoleSpec(
        name=name,
        **fields.settings(RoleConfig),
        deepspeed=deepspeed,
        image=fields.string("image"),
        gpus=fields.integer("gpus", 0, minimum=0),
        resources=_resources(fields.obj("resources")),
        node_selector=fields.string_map("nodeSelector"),
        tolerations=[_toleration(_Fields(t, fields.at(f"tolerations[{i}]"), fields.errors))
                     for i, t in enumerate(fields.array("tolerations"))],
    )
    fields.done()
    return role


def _resources(fields: _Fields) -> dict[str, Any]:
    resources = {key: fields.string_map(key, int_values=True) for key in ("requests", "limits") if fields.has(key)}
    fields.read.update(("requests", "limits"))
    fields.done()
    return resources


def _toleration(fields: _Fields) -> dict[str, Any]:
    parsed = {
        "key": fields.string("key"),
        "operator": fields.string("operator", enum=TOLERATION_OPERATORS),
        "value": fields.string("value"),
        "effect": fields.string("effect", enum=TAINT_EFFECTS),
        "tolerationSeconds": fields.integer("tolerationSeconds", 0),
    }
    fields.done()
    # Keep the user's keys only: the builders copy tolerations into pods as written.
    return {k: v for k, v in parsed.items() if fields.has(k)}


def _checkpoint(fields: _Fields) -> CheckpointSpec:
    shared = fields.settings(CheckpointConfig)
    vol = fields.obj("volume")
    claim = vol.string("existingClaim", max_length=253)
    size = vol.string("size", pattern=QUANTITY_PATTERN, max_length=64)
    volume = VolumeSpec(
        size=size or ("" if claim else DEFAULT_VOLUME_SIZE),
        storage_class_name=vol.string("storageClassName"),
        existing_claim=claim,
        retain=vol.boolean("retain", VolumeSpec.retain),
    )
    vol.done()
    fields.done()
    if claim and size:
        vol.error("", "set either existingClaim or size, not both")
    return CheckpointSpec(**shared, volume=volume)


def _scheduling(fields: _Fields) -> SchedulingSpec:
    scheduling = SchedulingSpec(
        gang_scheduler=fields.string("gangScheduler", enum=GANG_SCHEDULERS),
        queue=fields.string("queue"),
        priority_class_name=fields.string("priorityClassName"),
        gang_timeout_seconds=fields.integer("gangTimeoutSeconds", SchedulingSpec.gang_timeout_seconds, minimum=1),
    )
    fields.done()
    return scheduling


def _duplicate_role_errors(roles: tuple[RoleSpec, ...]) -> list[tuple[str, str]]:
    errors, seen = [], set()
    for i, role in enumerate(roles):
        if role.name and role.name in seen:
            errors.append((f"roles[{i}].name", f"duplicate role name {role.name!r}: role names must be unique"))
        seen.add(role.name)
    return errors


def _gang_shape_errors(roles: tuple[RoleSpec, ...], placed: list[tuple[str, layout.Placement]], batch_size: int,
                       bad: set[str]) -> list[tuple[str, str]]:
    """The trainer's startup checks of the process layout (it exits 78 on either): rlhf_contract.layout's
    replica and batch rules, on the fields that parsed cleanly."""
    index = next((i for i, r in enumerate(roles) if r.name == "actor"), None)
    if index is None or f"roles[{index}].replicas" in bad:
        return []
    errors = [(f"roles[{i}].replicas", problem) for i, problem in layout.replica_problems(placed)
              if f"roles[{i}].replicas" not in bad]
    problem = layout.batch_problem(roles[index].replicas, batch_size)
    if "hyperparameters.batchSize" not in bad and problem:
        errors.append(("hyperparameters.batchSize", problem))
    return errors


def _offload_errors(roles: tuple[RoleSpec, ...], bad: set[str]) -> list[tuple[str, str]]:
    """Optimizer offload is a ZeRO feature: the trainer's DeepSpeed config refuses it at stage 0 for
    the roles that hold an optimizer (the frozen roles never build one)."""
    return [
        (f"roles[{i}].deepspeed.offloadOptimizer",
         f"needs deepspeed.zeroStage >= 1 on the {role.name} (got zeroStage 0)")
        for i, role in enumerate(roles)
        if role.name in TRAINED_ROLES and role.deepspeed.offload_optimizer and role.deepspeed.zero_stage == 0
        and f"roles[{i}].deepspeed.zeroStage" not in bad
    ]


def _job_name_errors(name: str) -> list[tuple[str, str]]:
    if len(name) <= MAX_JOB_NAME_LENGTH:
        return []
    return [("metadata.name", f"must be at most {MAX_JOB_NAME_LENGTH} characters (got {len(name)}): pod names "
                              f"<job>-<role>-<index> are hostnames, at most 63 characters")]


def parse_job(obj: dict[str, Any], spec: JobSpec | None = None) -> Job:
    """An RLHFJob object (as the API returns it, or a manifest file) -> Job; SpecError if invalid.
    `spec`: the already parsed obj["spec"], when the caller has it (it is not parsed again)."""
    errors: list[tuple[str, str]] = []
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errors.append(("metadata.name", "is required"))
    else:
        errors.extend(_job_name_errors(name))
    if spec is None:
        try:
            spec = parse_spec(obj.get("spec"))
        except SpecError as e:
            errors.extend(e.errors)
    if errors or spec is None:
        raise SpecError(errors)
    status = obj.get("status")
    return Job(
        name=name,
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid") or "",
        generation=int(meta.get("generation") or 1),
        creation_timestamp=meta.get("creationTimestamp") or "",
        spec=spec,
        status=dict(status) if isinstance(status, dict) else {},
    )


def immutable_changes(old_spec: dict[str, Any], new_spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, message) for every change to what cannot change after creation: the algorithm and
    the role layout (names and colocateWith). The CRD's `self == oldSelf` rules say the same."""
    changes = []
    if old_spec.get("algorithm") != new_spec.get("algorithm"):
        changes.append(("algorithm", f"is immutable (was {old_spec.get('algorithm')!r}, "
                                     f"now {new_spec.get('algorithm')!r})"))
    old_layout, new_layout = _role_layout(old_spec), _role_layout(new_spec)
    if old_layout != new_layout:
        changes.append(("roles", f"role names and colocateWith are immutable (was {_describe(old_layout)}, "
                                 f"now {_describe(new_layout)})"))
    return changes


def _role_layout(spec: dict[str, Any]) -> dict[str, str]:
    roles = spec.get("roles") if isinstance(spec.get("roles"), list) else []
    return {str(r.get("name")): r.get("colocateWith") or "" for r in roles if isinstance(r, dict)}


def _describe(layout: dict[str, str]) -> str:
    return ", ".join(f"{name}->{host}" if host else name for name, host in sorted(layout.items())) or "none"
