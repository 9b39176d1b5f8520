"""The typed RLHFJob: spec and status dataclasses, and parse_spec() (docs/spec.md).

parse_spec() enforces the same rules as the CRD's schema and CEL rules, so the local runner (which
has no API server) rejects exactly what a cluster rejects, with every bad field named at once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

ALGORITHMS = ("ppo", "grpo", "rloo", "dpo", "rm", "sft")
ROLE_NAMES = ("actor", "critic", "reward", "reference")
REWARD_TYPES = ("model", "rule")
REWARD_RULES = ("exact_match", "regex", "callable")
DATASET_FORMATS = ("prompts", "pairs", "instruction", "ranked", "pair_list")
GANG_SCHEDULERS = ("volcano", "coscheduling", "none")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k3")
NON_FINITE_POLICIES = ("fail", "skip")
PHASES = ("Pending", "Creating", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
FINISHED_PHASES = ("Succeeded", "Failed")


def required_roles(algorithm: str, reward_type: str) -> tuple[str, ...]:
    """Role names an algorithm needs; a reward role exists iff the reward is a model."""
    base = {
        "ppo": ("actor", "critic", "reference"),
        "grpo": ("actor", "reference"),
        "rloo": ("actor", "reference"),
        "dpo": ("actor", "reference"),
        "rm": ("actor",),
        "sft": ("actor",),
    }[algorithm]
    if algorithm in ("ppo", "grpo", "rloo") and reward_type == "model":
        return (*base, "reward")
    return base


@dataclass(frozen=True)
class ModelSource:
    path: str


@dataclass(frozen=True)
class RewardSpec:
    type: str = "model"
    rule: str = ""
    pattern: str = ""
    callable: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    path: str
    format: str = "prompts"
    eval_path: str = ""


@dataclass(frozen=True)
class DeepSpeedSpec:
    zero_stage: int = 2
    bf16: bool = False
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class RoleSpec:
    name: str
    replicas: int = 1
    image: str = ""
    gpus: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    colocate_with: str = ""
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)


@dataclass(frozen=True)
class Hyperparameters:
    max_steps: int = 20
    learning_rate: float = 1e-5
    batch_size: int = 8
    micro_batch_size: int = 4
    max_prompt_length: int = 64
    max_new_tokens: int = 16
    temperature: float = 1.0
    seed: int = 0
    # ppo
    ppo_epochs: int = 1
    clip_range: float = 0.2
    dual_clip: float = 0.0
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float = 0.0
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    reward_clip: float = 10.0
    truncation_penalty: float = 1.0
    whiten_advantages: bool = True
    # grpo / rloo
    group_size: int = 4
    # dpo
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    # rm
    margin: float = 0.0
    # sft
    packing: bool = False
    # all: what a NaN / inf reward, loss or gradient norm does (fail the job, or skip the batch)
    non_finite: str = "fail"


@dataclass(frozen=True)
class VolumeSpec:
    size: str = "10Gi"
    storage_class_name: str = ""
    existing_claim: str = ""
    retain: bool = True


@dataclass(frozen=True)
class CheckpointSpec:
    interval_steps: int = 10
    keep: int = 3
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
    model: ModelSource
    dataset: DatasetSpec
    roles: tuple[RoleSpec, ...]
    image_pull_policy: str = "IfNotPresent"
    reward_model: ModelSource | None = None
    reward: RewardSpec = field(default_factory=RewardSpec)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    scheduling: SchedulingSpec = field(default_factory=SchedulingSpec)
    failure_policy: FailurePolicy = field(default_factory=FailurePolicy)
    suspend: bool = False
    active_deadline_seconds: int = 0
    ttl_seconds_after_finished: int = 0

    def role(self, name: str) -> RoleSpec:
        return next(r for r in self.roles if r.name == name)

    def pod_roles(self) -> tuple[RoleSpec, ...]:
        """Roles that get pods of their own (colocated roles run inside their host's pods)."""
        return tuple(r for r in self.roles if not r.colocate_with)

    def colocated_into(self, host: str) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles if r.colocate_with == host)


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
# Parsing. Each rule below has a twin in crds/rlhfjobs.yaml (schema keyword or CEL rule); the
# tests in tests/unit/test_crd.py run both over the same cases and check that they agree.

ONLINE_ALGORITHMS = ("ppo", "grpo", "rloo")
# Roles that hold no optimizer: ZeRO stage 0 is their default (the CRD leaves zeroStage unset).
FROZEN_ROLES = ("reward", "reference")
TRAINED_ROLES = ("actor", "critic")
# Algorithms that learn from preference pairs, and the dataset formats that hold pairs.
PAIR_ALGORITHMS = ("dpo", "rm")
PAIR_FORMATS = ("pairs", "ranked", "pair_list")
SYNTHETIC_PREFIX = "synthetic://"
# Pod names `<job>-<role>-<index>` are hostnames (at most 63 characters): 50 leaves room for
# "-reference-" and a two-digit index (the CRD's root rule says the same).
MAX_JOB_NAME_LENGTH = 50
DEFAULT_VOLUME_SIZE = VolumeSpec.size
# Kubernetes resource.Quantity syntax (the CRD uses the same pattern on checkpoint.volume.size).
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# "module:function" of a reward callable (the same pattern is in the CRD's CEL rule).
CALLABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# Hyperparameter bounds by manifest name; types and defaults come from the Hyperparameters fields.
# gt / lt are strict bounds (CEL rules in the CRD), minimum / maximum inclusive (schema keywords).
HYPERPARAMETER_BOUNDS: dict[str, dict[str, Any]] = {
    "maxSteps": {"minimum": 1},
    "learningRate": {"gt": 0},
    "batchSize": {"minimum": 1},
    "microBatchSize": {"minimum": 1},
    "maxPromptLength": {"minimum": 1},
    "maxNewTokens": {"minimum": 1},
    "temperature": {"gt": 0},
    "seed": {"minimum": 0},
    "ppoEpochs": {"minimum": 1},
    "clipRange": {"gt": 0},
    "dualClip": {"minimum": 0},  # and 0 or > 1: a rule of its own
    "valueClipRange": {"minimum": 0},
    "vfCoef": {"minimum": 0},
    "gamma": {"minimum": 0, "maximum": 1},
    "lam": {"minimum": 0, "maximum": 1},
    "klCoef": {"minimum": 0},
    "klTarget": {"minimum": 0},
    "klHorizon": {"minimum": 1},
    "klEstimator": {"enum": KL_ESTIMATORS},
    "rewardClip": {"gt": 0},
    "truncationPenalty": {"minimum": 0},
    "groupSize": {"minimum": 2},
    "beta": {"gt": 0},
    "lossType": {"enum": LOSS_TYPES},
    "labelSmoothing": {"minimum": 0, "lt": 0.5},
    "margin": {"minimum": 0},
    "nonFinite": {"enum": NON_FINITE_POLICIES},
}

_MISSING = object()


def camel_case(snake: str) -> str:
    """`max_new_tokens` -> `maxNewTokens` (dataclass field -> manifest key)."""
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


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
        elif enum and value not in enum:
            self.error(key, f"{_one_of(enum)} (got {value!r})")
        elif max_length and len(value) > max_length:
            self.error(key, f"must be at most {max_length} characters (got {len(value)})")
        elif pattern and not re.match(pattern, value):
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
        return value if self._in_bounds(key, value, **bounds) else default

    def number(self, key: str, default: float, **bounds: Any) -> float:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"must be a number, got {_kind(value)}")
            return default
        return float(value) if self._in_bounds(key, value, **bounds) else default

    def _in_bounds(self, key: str, value: float, minimum: float | None = None, maximum: float | None = None,
                   gt: float | None = None, lt: float | None = None) -> bool:
        checks = [(">=", minimum, minimum is not None and value < minimum),
                  ("<=", maximum, maximum is not None and value > maximum),
                  (">", gt, gt is not None and value <= gt),
                  ("<", lt, lt is not None and value >= lt)]
        problems = [f"must be {op} {bound} (got {value})" for op, bound, failed in checks if failed]
        for problem in problems:
            self.error(key, problem)
        return not problems

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
    algorithm = top.string("algorithm", required=True, enum=ALGORITHMS)
    image = top.string("image", required=True)
    pull_policy = top.string("imagePullPolicy", JobSpec.image_pull_policy, enum=PULL_POLICIES)
    model = _model(top.obj("model")) if _present(top, "model") else ModelSource(path="")
    top.read.add("rewardModel")  # known even when null
    reward_model = _model(top.obj("rewardModel")) if top.has("rewardModel") else None
    reward = _reward(top.obj("reward"))
    dataset = _dataset(top.obj("dataset")) if _present(top, "dataset") else DatasetSpec(path="")
    raw_roles = top.array("roles", required=True)
    roles_given = isinstance(top.raw.get("roles"), list)
    if roles_given and not 1 <= len(raw_roles) <= len(ROLE_NAMES):
        top.error("roles", f"must have 1 to {len(ROLE_NAMES)} roles (got {len(raw_roles)})")
    roles = tuple(_role(_Fields(raw, f"roles[{i}]", errors)) for i, raw in enumerate(raw_roles))
    hyperparameters = _hyperparameters(top.obj("hyperparameters"))
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
        errors.extend(_role_set_errors(algorithm, reward.type, roles))
    errors.extend(_colocation_errors(roles))
    if algorithm in ONLINE_ALGORITHMS and reward.type == "model" and reward_model is None:
        errors.append(("rewardModel", "is required when reward.type is model (algorithms ppo, grpo, rloo)"))
    errors.extend(_gang_shape_errors(roles, hyperparameters.batch_size, bad))
    errors.extend(_offload_errors(roles, bad))
    if algorithm in ALGORITHMS and dataset.path and "dataset.format" not in bad:
        errors.extend(_dataset_format_errors(algorithm, dataset))
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


def _model(fields: _Fields) -> ModelSource:
    source = ModelSource(path=fields.string("path", required=True))
    fields.done()
    return source


def _reward(fields: _Fields) -> RewardSpec:
    reward = RewardSpec(
        type=fields.string("type", RewardSpec.type, enum=REWARD_TYPES),
        rule=fields.string("rule", enum=REWARD_RULES),
        pattern=fields.string("pattern", max_length=1024),
        callable=fields.string("callable", max_length=253),
    )
    fields.done()
    if reward.type == "rule" and not reward.rule:
        fields.error("rule", f"is required when type is rule; {_one_of(REWARD_RULES)}")
    if reward.rule == "regex" and not reward.pattern:
        fields.error("pattern", "is required when rule is regex")
    if reward.rule == "callable" and not re.match(CALLABLE_PATTERN, reward.callable):
        fields.error("callable", f'must be "module:function" when rule is callable (got {reward.callable!r})')
    return reward


def _dataset(fields: _Fields) -> DatasetSpec:
    dataset = DatasetSpec(
        path=fields.string("path", required=True),
        format=fields.string("format", DatasetSpec.format, enum=DATASET_FORMATS),
        eval_path=fields.string("evalPath"),
    )
    fields.done()
    return dataset


def _role(fields: _Fields) -> RoleSpec:
    name = fields.string("name", required=True, enum=ROLE_NAMES)
    ds = fields.obj("deepspeed")
    deepspeed = DeepSpeedSpec(
        zero_stage=ds.integer("zeroStage", 0 if name in FROZEN_ROLES else DeepSpeedSpec.zero_stage,
                              minimum=0, maximum=3),
        bf16=ds.boolean("bf16", DeepSpeedSpec.bf16),
        offload_optimizer=ds.boolean("offloadOptimizer", DeepSpeedSpec.offload_optimizer),
        gradient_checkpointing=ds.boolean("gradientCheckpointing", DeepSpeedSpec.gradient_checkpointing),
    )
    ds.done()
    role = RoleSpec(
        name=name,
        replicas=fields.integer("replicas", RoleSpec.replicas, minimum=1),
        image=fields.string("image"),
        gpus=fields.integer("gpus", 0, minimum=0),
        resources=_resources(fields.obj("resources")),
        node_selector=fields.string_map("nodeSelector"),
        tolerations=[_toleration(_Fields(t, fields.at(f"tolerations[{i}]"), fields.errors))
                     for i, t in enumerate(fields.array("tolerations"))],
        colocate_with=fields.string("colocateWith", max_length=16),
        deepspeed=deepspeed,
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


def _hyperparameters(fields: _Fields) -> Hyperparameters:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Hyperparameters):
        key = camel_case(f.name)
        read = {"int": fields.integer, "float": fields.number, "bool": fields.boolean, "str": fields.string}[f.type]
        values[f.name] = read(key, f.default, **HYPERPARAMETER_BOUNDS.get(key, {}))
    fields.done()
    if values["dual_clip"] != 0 and values["dual_clip"] <= 1:
        fields.error("dualClip", f"must be 0 (off) or > 1 (got {values['dual_clip']})")
    return Hyperparameters(**values)


def _checkpoint(fields: _Fields) -> CheckpointSpec:
    interval = fields.integer("intervalSteps", CheckpointSpec.interval_steps, minimum=1)
    keep = fields.integer("keep", CheckpointSpec.keep, minimum=1)
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
    return CheckpointSpec(interval_steps=interval, keep=keep, volume=volume)


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


def _role_set_errors(algorithm: str, reward_type: str, roles: tuple[RoleSpec, ...]) -> list[tuple[str, str]]:
    """The set of role names must be exactly required_roles()."""
    errors: list[tuple[str, str]] = []
    names = [r.name for r in roles if r.name in ROLE_NAMES]
    required = required_roles(algorithm, reward_type)
    missing = [n for n in required if n not in names]
    extra = [n for n in dict.fromkeys(names) if n not in required]
    if missing or extra:
        why = f"algorithm {algorithm}" + (f" with reward.type {reward_type}" if algorithm in ONLINE_ALGORITHMS else "")
        detail = "; ".join(
            [f"missing: {', '.join(missing)}"] * bool(missing) + [f"not allowed: {', '.join(extra)}"] * bool(extra)
        )
        errors.append(("roles", f"must be exactly the roles {', '.join(required)} for {why} ({detail})"))
    return errors


def _colocation_errors(roles: tuple[RoleSpec, ...]) -> list[tuple[str, str]]:
    """colocateWith names another role of the job that itself has pods (no chains)."""
    by_name = {r.name: r for r in roles}
    errors = []
    for i, role in enumerate(roles):
        host = role.colocate_with
        if not host:
            continue
        if role.name == "actor":
            problem = "must be unset on the actor: the actor needs pods of its own"
        elif host == role.name:
            problem = "must name another role, not the role itself"
        elif host not in by_name:
            problem = f"must name a role of this job ({', '.join(by_name)})"
        elif by_name[host].colocate_with:
            problem = f"must name a role with pods of its own ({host!r} is itself colocated)"
        else:
            continue
        errors.append((f"roles[{i}].colocateWith", f"{problem} (got {host!r})"))
    return errors


def _gang_shape_errors(roles: tuple[RoleSpec, ...], batch_size: int, bad: set[str]) -> list[tuple[str, str]]:
    """The trainer's startup checks of the process layout (it exits 78 on either): actor rank i is
    served by rank i mod n of each other role, so a role with pods may not have more replicas than
    the actor (its extra ranks would idle and hang their world); and every actor rank takes an equal
    share of hyperparameters.batchSize."""
    index = next((i for i, r in enumerate(roles) if r.name == "actor"), None)
    if index is None or f"roles[{index}].replicas" in bad:
        return []
    actors = roles[index].replicas
    errors = [
        (f"roles[{i}].replicas", f"must be at most the actor's replicas ({actors}): each rank of a role with pods "
                                 f"serves actor ranks (got {role.replicas})")
        for i, role in enumerate(roles)
        if role.name != "actor" and not role.colocate_with and f"roles[{i}].replicas" not in bad
        and role.replicas > actors
    ]
    if "hyperparameters.batchSize" not in bad and batch_size % actors:
        errors.append(("hyperparameters.batchSize", f"must be divisible by the actor's replicas ({actors}): every "
                                                    f"actor rank takes an equal share (got {batch_size})"))
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


def _dataset_format_errors(algorithm: str, dataset: DatasetSpec) -> list[tuple[str, str]]:
    """dpo and rm learn from preference pairs: a JSONL file must be in a pair format (the trainer
    exits 78 otherwise). A synthetic:// dataset brings its own format, so `format` is not read."""
    if algorithm not in PAIR_ALGORITHMS or dataset.path.startswith(SYNTHETIC_PREFIX):
        return []
    if dataset.format in PAIR_FORMATS:
        return []
    return [("dataset.format", f"must be one of {', '.join(PAIR_FORMATS)} for algorithm {algorithm}, which learns "
                               f"from preference pairs (got {dataset.format!r})")]


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
