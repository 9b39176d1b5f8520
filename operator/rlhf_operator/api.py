"""The typed RLHFJob: spec and status dataclasses, and parse_spec() (docs/spec.md).

parse_spec() enforces the same rules as the CRD's schema and CEL rules, so the local runner (which
has no API server) rejects exactly what a cluster rejects, with every bad field named at once.
"""

from __future__ import annotations

import functools
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
    CriticConfig,
    DatasetConfig,
    DatasetFields,
    DeepSpeedConfig,
    Hyperparameters,
    LoraConfig,
    MlflowConfig,
    ModelConfig,
    RewardConfig,
    RoleConfig,
    TrackersConfig,
    WandbConfig,
    critic_problem,
    dataset_format_problem,
    lora_problems,
    turns_problem,
)
from rlhf_contract.knobs import Knob, Setting, settings_of
from rlhf_contract.sources import SourceRef, parse_source, source_uri

from rlhf_operator.podtemplate import PodTemplate, parse_pod_template

GANG_SCHEDULERS = ("volcano", "coscheduling", "none")
# The dataset's path fields (DatasetConfig name, manifest name): each may name a source.
DATASET_PATHS = (("path", "path"), ("eval_path", "evalPath"), ("pretrain_path", "pretrainPath"))
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
PHASES = ("Pending", "Creating", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
FINISHED_PHASES = ("Succeeded", "Failed")
# status.conditions[].type: the CRD's enum (the API server refuses a status write with any other, so a
# condition missing here would leave the job's whole status unwritten).
CONDITION_TYPES = ("SourcesReady", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Degraded")


@dataclass(frozen=True, kw_only=True)
class ModelSource(ModelConfig):
    """A model as the manifest names it: `path` (shared with the trainer config: a folder in the image or a
    source URI, rlhf_contract.sources; the manifest's `pvc` + `subPath` and `revision` are folded into it
    as pvc://CLAIM/SUBPATH and hf://ORG/NAME@REVISION), or `fromJob`, another RLHFJob of the namespace
    whose exported model the job starts from once that job has Succeeded (rlhf_operator.chain; docs/spec.md
    "Chaining jobs"). Exactly one is set."""

    from_job: str = ""


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
    pod_template: PodTemplate = field(default_factory=PodTemplate)  # merged after the job's (podtemplate.py)
    shared_memory_size: str = ""  # /dev/shm size limit; "" = the job's


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
class SecretKeyRef:
    """A key of a Secret in the job's namespace; the pods get it as a secretKeyRef env (never read here)."""

    name: str
    key: str


@dataclass(frozen=True)
class S3Spec:
    """sources.s3: the store of every s3:// source. endpoint "" = AWS; the Secret `credentials_secret`
    holds the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and AWS_SESSION_TOKEN when its credentials
    are temporary (STS) ones ("" = the pod's IRSA / Pod Identity role if
    it has one, else no credentials: a public bucket; rlhf_trainer.initializer.s3_client)."""

    endpoint: str = ""
    region: str = ""
    credentials_secret: str = ""


@dataclass(frozen=True)
class SourcesSpec:
    """spec.sources: credentials and endpoints of the remote sources (hf://, s3://) the initializer fetches."""

    hf_token_secret: SecretKeyRef | None = None  # HF_TOKEN: gated or private Hub repositories
    s3: S3Spec = field(default_factory=S3Spec)


@dataclass(frozen=True, kw_only=True)
class WandbSpec(WandbConfig):
    """trackers.wandb: the trainer's settings plus the Secret holding the API key."""

    api_key_secret: SecretKeyRef | None = None


@dataclass(frozen=True, kw_only=True)
class MlflowSpec(MlflowConfig):
    """trackers.mlflow: the trainer's settings plus the Secret holding the tracking server's token."""

    token_secret: SecretKeyRef | None = None


@dataclass(frozen=True, kw_only=True)
class TrackersSpec(TrackersConfig):
    wandb: WandbSpec = field(default_factory=WandbSpec)
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)


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
    # Gangs recreated after not running within gangTimeoutSeconds; one more timeout fails the job.
    max_gang_timeouts: int = 5
    # Gang restarts after disruptions (eviction, preemption, node loss, a pod deleted by someone else),
    # counted apart from maxRestarts; one more disruption fails the job.
    max_disruptions: int = 10


@dataclass(frozen=True)
class JobSpec:
    algorithm: str
    image: str
    model: ModelSource
    dataset: DatasetConfig
    roles: tuple[RoleSpec, ...]
    image_pull_policy: str = "IfNotPresent"
    reward_model: ModelSource | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    trackers: TrackersSpec = field(default_factory=TrackersSpec)
    scheduling: SchedulingSpec = field(default_factory=SchedulingSpec)
    failure_policy: FailurePolicy = field(default_factory=FailurePolicy)
    suspend: bool = False
    active_deadline_seconds: int = 0
    ttl_seconds_after_finished: int = 0
    # The pods' terminationGracePeriodSeconds (Kubernetes' default): SIGTERM to SIGKILL, the time a
    # stopped trainer has to save a last checkpoint (RLHF_TERMINATION_GRACE_SECONDS).
    termination_grace_period_seconds: int = 30
    pod_template: PodTemplate = field(default_factory=PodTemplate)  # every pod (podtemplate.py)
    shared_memory_size: str = ""  # /dev/shm (a memory emptyDir) size limit; "" = no limit but the pod's memory
    sources: SourcesSpec = field(default_factory=SourcesSpec)

    def role(self, name: str) -> RoleSpec:
        return next(r for r in self.roles if r.name == name)

    def model_sources(self) -> tuple[tuple[str, ModelSource], ...]:
        """(manifest field, source) of every model the job names: model, rewardModel."""
        named = (("model", self.model), ("rewardModel", self.reward_model))
        return tuple((key, source) for key, source in named if source is not None)

    def from_jobs(self) -> tuple[str, ...]:
        """The RLHFJobs this job starts from (fromJob of its models), each once, in field order."""
        return tuple(dict.fromkeys(s.from_job for _, s in self.model_sources() if s.from_job))

    def source_fields(self) -> tuple[tuple[str, SourceRef, str], ...]:
        """(manifest field, parsed source, repo type) of every path field that names a pvc:// or remote
        source (rlhf_contract.sources), in field order; image paths and fromJob are not listed."""
        named = [(f"{key}.path", source.path, "model") for key, source in self.model_sources() if source.path]
        named.append(("critic.model", self.critic.model, "model"))
        named += [(f"dataset.{camel}", getattr(self.dataset, name), "dataset") for name, camel in DATASET_PATHS]
        out = []
        for key, text, repo_type in named:
            ref = parse_source(text) if text and "://" in text else None
            if ref is not None and ref.kind != "image":
                out.append((key, ref, repo_type))
        return tuple(out)

    @functools.cached_property
    def placements(self) -> dict[str, layout.Placement]:
        """Role name -> placement (computed once: the builders ask for every pod)."""
        return {r.name: layout.Placement(r.replicas, r.colocate_with, r.processes_per_pod) for r in self.roles}

    def pod_roles(self) -> tuple[RoleSpec, ...]:
        """Roles that get pods of their own (colocated roles run inside their host's pods)."""
        return tuple(r for r in self.roles if not r.colocate_with)

    def colocated_into(self, host: str) -> tuple[str, ...]:
        return layout.colocated_into(self.placements, host)


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

# --- Kubernetes name rules (k8s.io/apimachinery/pkg/util/validation), as the API server applies them to
# the objects the builders derive. Each has its twin in crds/rlhfjobs.yaml (a pattern or a CEL rule).
# A Service name (the job's headless Service is `<job>`) is a DNS-1035 label.
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Object names of most kinds (ConfigMap, PVC, PriorityClass, StorageClass) are DNS-1123 subdomains.
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label value (empty, or alphanumerics with -_. inside) of at most 63 characters.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A label key: an optional DNS-1123 subdomain prefix and '/', then a name of at most 63 characters.
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
# A queue is a Kueue LocalQueue named in a pod label, or a Volcano Queue object: both rules at once.
QUEUE_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# Container images may not start or end with whitespace (the API server refuses the pod).
IMAGE_PATTERN = r"^\S(.*\S)?$"
MAX_LABEL_LENGTH = 63  # a DNS label, a hostname, a label value
MAX_SUBDOMAIN_LENGTH = 253
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # a Secret's data key (Kubernetes' IsConfigMapKey)
# A nodeSelector's entries at most (the CRD's maxProperties: it bounds the cost of its CEL key rule).
MAX_SELECTOR_ENTRIES = 32
# Durations of the spec (activeDeadlineSeconds, ...): int32, as Kubernetes' Job fields; the planner adds them
# to a timestamp, and now + 68 years is a datetime where now + 1e15 s is an OverflowError.
MAX_DURATION_SECONDS = 2**31 - 1
# Pod names `<job>-<role>-<index>` are hostnames (at most 63 characters). The actor always has pods,
# so `<job>-actor-0` bounds every job name; longer role names and more replicas bound it further.
MAX_JOB_NAME_LENGTH = MAX_LABEL_LENGTH - len("-actor-0")
DEFAULT_VOLUME_SIZE = VolumeSpec.size
# Kubernetes resource.Quantity syntax (the CRD uses the same pattern on checkpoint.volume.size).
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_MISSING = object()

RULE_DNS_1035 = ("a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending with "
                 "a letter or digit")
RULE_SUBDOMAIN = ("a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a "
                  "letter or digit")
RULE_QUEUE = ("a queue name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit "
              "(a Kueue queue name is a label value)")
RULE_IMAGE = "an image reference without leading or trailing whitespace"


def label_errors(key: str, value: str) -> list[str]:
    """What the API server says of one label (or nodeSelector entry), as messages; [] when valid."""
    problems = []
    prefix = key.rpartition("/")[0]
    if not re.match(QUALIFIED_NAME, key) or len(prefix) > MAX_SUBDOMAIN_LENGTH:
        problems.append(f"key {key!r} must be a qualified name: an optional DNS-1123 subdomain prefix and '/', "
                        f"then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    if len(value) > MAX_LABEL_LENGTH or not re.match(LABEL_VALUE, value):
        problems.append(f"value {value!r} must be a label value: at most 63 letters, digits, '-', '_' or '.', "
                        f"starting and ending with a letter or digit")
    return problems


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


def _bounds(bounds: dict[str, Any]) -> Knob | None:
    """The rules of a Kubernetes-only number field (`minimum=0`), in the contract's Knob shape."""
    return Knob("", **bounds) if bounds else None


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
               pattern: str = "", max_length: int = 0, rule: str = "") -> str:
        """A string field; `rule` describes `pattern` in words for the message (else the regex is shown)."""
        value = self._value(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {_kind(value)}")
            return default
        if required and not value:
            self.error(key, "must not be empty")
        elif self._valid(key, value, Knob("", enum=enum, max_length=max_length) if enum or max_length else None) \
                and pattern and value and not re.match(pattern, value):
            self.error(key, f"must be {rule} (got {value!r})" if rule else f"must match {pattern} (got {value!r})")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be a boolean, got {_kind(value)}")
            return default
        return value

    def integer(self, key: str, default: int, knob: Knob | None = None, **bounds: Any) -> int:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 3.0 is the integer 3
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be an integer, got {_kind(value)}")
            return default
        return value if self._valid(key, value, knob or _bounds(bounds)) else default

    def number(self, key: str, default: float, knob: Knob | None = None, **bounds: Any) -> float:
        value = self._value(key, False)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"must be a number, got {_kind(value)}")
            return default
        return float(value) if self._valid(key, value, knob or _bounds(bounds)) else default

    def _valid(self, key: str, value: Any, knob: Knob | None) -> bool:
        problems = knob.problems(value) if knob else []
        for problem in problems:
            self.error(key, problem)
        return not problems

    def setting(self, s: Setting, default: Any = _MISSING) -> Any:
        """A field shared with the trainer, by its camelCase name, with its knob's rules."""
        default = s.default if default is _MISSING else default
        k = s.knob
        if s.type is str:
            value = self.string(s.camel, "" if s.required else default, required=s.required, enum=k.enum,
                                max_length=k.max_length)
            if k.rule is not None and self.has(s.camel) and isinstance(value, str) and not k.rule.check(value):
                self.error(s.camel, f"{k.rule.message} (got {value[:40]!r})")
            return value
        if s.type is bool:
            return self.boolean(s.camel, default)
        read = self.integer if s.type is int else self.number
        return read(s.camel, default, k)

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

    def string_map(self, key: str, *, int_values: bool = False, labels: bool = False) -> dict[str, Any]:
        """A map of strings (nodeSelector), or of quantities (int-or-string) when int_values; `labels`:
        keys and values follow the label rules (a nodeSelector is validated as labels are)."""
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
            elif labels:
                self.errors.extend((self.at(f"{key}.{k}"), m) for m in label_errors(k, v))
        if labels and len(value) > MAX_SELECTOR_ENTRIES:
            self.error(key, f"must have at most {MAX_SELECTOR_ENTRIES} entries (got {len(value)})")
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
    image = top.string("image", required=True, pattern=IMAGE_PATTERN, rule=RULE_IMAGE)
    pull_policy = top.string("imagePullPolicy", JobSpec.image_pull_policy, enum=PULL_POLICIES)
    model = _model_source(top.obj("model")) if _present(top, "model") else ModelSource(path="")
    top.read.add("rewardModel")  # known even when null
    reward_model = _model_source(top.obj("rewardModel")) if top.has("rewardModel") else None
    reward = _reward(top.obj("reward"))
    critic = _settings(top.obj("critic"), CriticConfig)
    dataset = _dataset(top.obj("dataset")) if _present(top, "dataset") else DatasetConfig(path="")
    raw_roles = top.array("roles", required=True)
    roles_given = isinstance(top.raw.get("roles"), list)
    if roles_given and not 1 <= len(raw_roles) <= len(ROLE_NAMES):
        top.error("roles", f"must have 1 to {len(ROLE_NAMES)} roles (got {len(raw_roles)})")
    roles = tuple(_role(_Fields(raw, f"roles[{i}]", errors)) for i, raw in enumerate(raw_roles))
    hyperparameters = _settings(top.obj("hyperparameters"), Hyperparameters)
    checkpoint = _checkpoint(top.obj("checkpoint"))
    trackers = _trackers(top.obj("trackers"))
    scheduling = _scheduling(top.obj("scheduling"))
    failure = top.obj("failurePolicy")
    failure_policy = FailurePolicy(
        max_restarts=failure.integer("maxRestarts", FailurePolicy.max_restarts, minimum=0),
        backoff_seconds=_seconds(failure, "backoffSeconds", FailurePolicy.backoff_seconds, minimum=1),
        max_gang_timeouts=failure.integer("maxGangTimeouts", FailurePolicy.max_gang_timeouts, minimum=0),
        max_disruptions=failure.integer("maxDisruptions", FailurePolicy.max_disruptions, minimum=0),
    )
    failure.done()
    suspend = top.boolean("suspend", JobSpec.suspend)
    deadline = _seconds(top, "activeDeadlineSeconds", JobSpec.active_deadline_seconds, minimum=0)
    ttl = _seconds(top, "ttlSecondsAfterFinished", JobSpec.ttl_seconds_after_finished, minimum=0)
    grace = _seconds(top, "terminationGracePeriodSeconds", JobSpec.termination_grace_period_seconds, minimum=0)
    pod_template = _template(top)
    shm = top.string("sharedMemorySize", pattern=QUANTITY_PATTERN, max_length=64)
    sources = _sources(top.obj("sources"))
    top.done()

    # Cross-field rules read only fields that parsed cleanly (a bad field already has its error).
    bad = {path for path, _ in errors}
    errors.extend(_duplicate_role_errors(roles))
    if algorithm in ALGORITHMS and roles_given:
        problem = role_set_problem(algorithm, reward.type, [r.name for r in roles if r.name in ROLE_NAMES])
        if problem:
            errors.append(("roles", problem))
    placed = [(r.name, layout.Placement(r.replicas, r.colocate_with, r.processes_per_pod)) for r in roles]
    errors.extend((f"roles[{i}].colocateWith", problem) for i, problem in layout.colocation_problems(placed))
    errors.extend(_colocated_rank_field_errors(raw_roles, roles))
    if algorithm in ALGORITHMS and ALGORITHMS[algorithm].needs_reward_model(reward.type) and reward_model is None:
        errors.append(("rewardModel", f"is required when reward.type is {reward.type} (algorithms {', '.join(ONLINE)})"))
    if algorithm in ALGORITHMS and "critic.model" not in bad:
        problem = critic_problem(algorithm, reward.type, critic)
        if problem:
            errors.append(("critic.model", problem))
    turn_fields = {"hyperparameters.turns", "hyperparameters.selfCorrection", "reward.type"}
    if algorithm in ALGORITHMS and not turn_fields & bad:
        problem = turns_problem(algorithm, reward.type, hyperparameters.turns, hyperparameters.self_correction)
        if problem:
            errors.append(("hyperparameters.turns", problem))
    errors.extend(_scheduler_name_errors(scheduling, pod_template, roles))
    errors.extend(_gang_shape_errors(roles, placed, hyperparameters.batch_size, bad))
    errors.extend(_offload_errors(roles, bad))
    errors.extend(_gpu_mix_errors(roles, bad))
    errors.extend(_source_errors(critic, dataset, bad))
    if algorithm in ALGORITHMS and dataset.path and "dataset.format" not in bad:
        problem = dataset_format_problem(algorithm, dataset)
        if problem:
            errors.append(("dataset.format", problem))
    if errors:
        raise SpecError(errors)
    return JobSpec(
        algorithm=algorithm, image=image, model=model, dataset=dataset, roles=roles,
        image_pull_policy=pull_policy, reward_model=reward_model, reward=reward, critic=critic,
        hyperparameters=hyperparameters, checkpoint=checkpoint, trackers=trackers, scheduling=scheduling,
        failure_policy=failure_policy, suspend=suspend, active_deadline_seconds=deadline,
        ttl_seconds_after_finished=ttl, termination_grace_period_seconds=grace,
        pod_template=pod_template, shared_memory_size=shm, sources=sources,
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


MODEL_SOURCE_KEYS = ("path", "pvc", "fromJob")
MODEL_SOURCE_RULE = ("set exactly one of path, pvc or fromJob (path: a model folder in the image, hf://ORG/NAME or "
                     "s3://BUCKET/PREFIX; pvc: a PersistentVolumeClaim of the namespace, with subPath; fromJob: "
                     "another RLHFJob whose exported model to start from)")


def _model_source(fields: _Fields) -> ModelSource:
    """Exactly one of `path` (a contract knob: a folder in the image or a source URI), `pvc` (+ `subPath`)
    or `fromJob`; `revision` only with an hf:// path. The CRD's CEL rules on the object say the same."""
    given = [key for key in MODEL_SOURCE_KEYS if fields.has(key)]
    from_job = fields.string("fromJob", pattern=DNS_1035_LABEL, max_length=MAX_JOB_NAME_LENGTH, rule=RULE_DNS_1035)
    claim = fields.string("pvc", max_length=MAX_SUBDOMAIN_LENGTH, pattern=DNS_1123_SUBDOMAIN, rule=RULE_SUBDOMAIN)
    sub_path = fields.string("subPath", max_length=4096)
    revision = fields.string("revision", max_length=128)
    fields.read.add("path")
    path = fields.settings(ModelConfig)["path"] if "path" in given else ""
    if len(given) != 1 and not fields.wrong_type:
        fields.error("", MODEL_SOURCE_RULE + (f", got {' and '.join(given)}" if given else ""))
    if sub_path and not claim:
        fields.error("subPath", "is only read with pvc (a folder inside the claim)")
    if claim:
        path = f"pvc://{claim}" + (f"/{sub_path.strip('/')}" if sub_path.strip("/") else "")
    reported = any(at == fields.at("path") for at, _ in fields.errors)  # the CRD's scheme rule said it
    ref = _source_ref(fields, "subPath" if claim else "path", path) if path and not reported else None
    if revision:
        if ref is None or ref.kind != "hf" or ref.revision:
            fields.error("revision", "is only read with an hf://ORG/NAME path without @REVISION")
        else:
            path = source_uri(SourceRef("hf", ref.location, revision=revision, inner=ref.inner))
    fields.done()
    return ModelSource(path=path, from_job=from_job)


def _source_ref(fields: _Fields, key: str, text: str) -> SourceRef | None:
    """parse_source() of a path field, its problem reported on `key`; None when bad."""
    try:
        return parse_source(text)
    except ValueError as exc:
        fields.error(key, f"{exc} (got {text[:80]!r})")
        return None


def _source_errors(critic: CriticConfig, dataset: DatasetConfig, bad: set[str]) -> list[tuple[str, str]]:
    """The path fields outside `model` objects that may name a source: critic.model (a model folder or
    URI, unless one of CRITIC_SOURCES) and the dataset's paths."""
    named = [("critic.model", critic.model)] + [(f"dataset.{camel}", getattr(dataset, name))
                                               for name, camel in DATASET_PATHS]
    errors = []
    for key, text in named:
        if key in bad or "://" not in text:
            continue
        try:
            parse_source(text)
        except ValueError as exc:
            errors.append((key, f"{exc} (got {text[:80]!r})"))
    return errors


def _sources(fields: _Fields) -> SourcesSpec:
    s3 = fields.obj("s3")
    spec = SourcesSpec(
        hf_token_secret=_secret_key_ref(fields, "hfTokenSecret"),
        s3=S3Spec(endpoint=s3.string("endpoint", max_length=2048, pattern=r"^https?://\S+$",
                                     rule="an http:// or https:// URL"),
                  region=s3.string("region", max_length=64),
                  credentials_secret=s3.string("credentialsSecret", max_length=MAX_SUBDOMAIN_LENGTH,
                                               pattern=DNS_1123_SUBDOMAIN, rule=RULE_SUBDOMAIN)),
    )
    s3.done()
    fields.done()
    return spec


def _dataset(fields: _Fields) -> DatasetConfig:
    column_map = _settings(fields.obj("fields"), DatasetFields)
    dataset = DatasetConfig(**fields.settings(DatasetConfig), fields=column_map)
    fields.done()
    return dataset


def _reward(fields: _Fields) -> RewardConfig:
    reward = _settings(fields, RewardConfig)
    if reward.type == "rule" and not reward.rule:
        fields.error("rule", f"is required when type is rule; {_one_of(REWARD_RULES)}")
    if reward.rule == "regex" and not reward.pattern:
        fields.error("pattern", "is required when rule is regex")
    if reward.rule == "callable" and not re.match(CALLABLE_PATTERN, reward.callable):
        fields.error("callable", f'must be "module:function" when rule is callable (got {reward.callable!r})')
    return reward


def _seconds(fields: _Fields, key: str, default: int, *, minimum: int) -> int:
    """A duration field of the spec, at most MAX_DURATION_SECONDS."""
    return fields.integer(key, default, minimum=minimum, maximum=MAX_DURATION_SECONDS)


def _role(fields: _Fields) -> RoleSpec:
    name = fields.string("name", required=True, enum=ROLE_NAMES)
    # Roles that hold no optimizer default to ZeRO stage 0 (the CRD leaves zeroStage unset).
    zero_stage = 0 if name in FROZEN_ROLES else DeepSpeedConfig.zero_stage
    deepspeed = _settings(fields.obj("deepspeed"), DeepSpeedConfig, zero_stage=zero_stage)
    lora = _settings(fields.obj("lora"), LoraConfig)
    for key, problem in lora_problems(name, lora, deepspeed.zero_stage) if name in ROLE_NAMES else ():
        fields.error(key, problem)
    gpus = fields.integer("gpus", 0, minimum=0)
    role = RoleSpec(
        name=name,
        # One process per GPU unless processesPerPod says otherwise (the CRD leaves it unset).
        **fields.settings(RoleConfig, processes_per_pod=max(gpus, 1)),
        deepspeed=deepspeed,
        lora=lora,
        image=fields.string("image", pattern=IMAGE_PATTERN, rule=RULE_IMAGE),
        gpus=gpus,
        resources=_resources(fields.obj("resources")),
        node_selector=fields.string_map("nodeSelector", labels=True),
        tolerations=[_toleration(_Fields(t, fields.at(f"tolerations[{i}]"), fields.errors))
                     for i, t in enumerate(fields.array("tolerations"))],
        pod_template=_template(fields),
        shared_memory_size=fields.string("sharedMemorySize", pattern=QUANTITY_PATTERN, max_length=64),
    )
    # A colocated role's processesPerPod and gpus are refused as set at all (_colocated_rank_field_errors).
    if gpus and role.processes_per_pod > gpus and not role.colocate_with:  # its CEL twin: the CRD's role item rules
        fields.error("processesPerPod", f"is {role.processes_per_pod} but the pod has gpus: {gpus}: must be at most "
                                        f"gpus when gpus > 0 (each process takes the GPU of its local rank)")
    fields.done()
    return role


# The fields that say how many ranks a role runs and on what, each with its value when unset (the CRD's
# default). A colocated role has no pods: it runs in its host's ranks, so each is refused there instead of
# silently ignored. Its other pod fields (resources, nodeSelector, ...) are unused, as docs/spec.md says.
RANK_FIELDS = (("replicas", 1), ("processesPerPod", None), ("gpus", 0))


def _colocated_rank_field_errors(raw_roles: list[Any], roles: tuple[RoleSpec, ...]) -> list[tuple[str, str]]:
    """(path, problem) for every RANK_FIELDS field set on a role with colocateWith (its CEL twins: the
    CRD's role item rules)."""
    errors = []
    for i, (raw, role) in enumerate(zip(raw_roles, roles, strict=True)):
        if not role.colocate_with or not isinstance(raw, dict):
            continue
        host = role.colocate_with
        errors.extend((f"roles[{i}].{key}", f"must be unset on a colocated role: the {role.name} runs in the "
                                            f"ranks of the {host}'s pods (set it on the {host})")
                      for key, unset in RANK_FIELDS if key in raw and raw[key] != unset)
    return errors


def _template(fields: _Fields) -> PodTemplate:
    """podTemplate of the job or a role (podtemplate.parse_pod_template names every problem)."""
    fields.read.add("podTemplate")
    template, problems = parse_pod_template(fields.raw.get("podTemplate"), fields.at("podTemplate"))
    fields.errors.extend(problems)
    tolerations = template.spec.get("tolerations")
    for i, toleration in enumerate(tolerations if isinstance(tolerations, list) else []):
        at = f"{fields.at('podTemplate')}.spec.tolerations[{i}]"
        if not isinstance(toleration, dict):
            fields.errors.append((at, f"must be an object, got {_kind(toleration)}"))
            continue
        for key, allowed in (("operator", TOLERATION_OPERATORS), ("effect", TAINT_EFFECTS)):
            if key in toleration and toleration[key] not in allowed:
                fields.errors.append((f"{at}.{key}", f"{_one_of(allowed)} (got {toleration[key]!r})"))
        fields.errors.extend((f"{at}.{key}", message) for key, message in toleration_errors(toleration))
    return template


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
    kept = {k: v for k, v in parsed.items() if fields.has(k)}
    for key, message in toleration_errors(kept):
        fields.error(key, message)
    return kept


def toleration_errors(toleration: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for each rule of Kubernetes' ValidateTolerations (pkg/apis/core/validation) that one
    toleration breaks; [] when the API server would take it in a pod. The operator defaults to Equal."""
    problems = []
    key, operator, value = toleration.get("key", ""), toleration.get("operator", "Equal"), toleration.get("value", "")
    if key and (not re.match(QUALIFIED_NAME, key) or len(key.rpartition("/")[0]) > MAX_SUBDOMAIN_LENGTH):
        problems.append(("key", f"{key!r} must be a qualified name: an optional DNS-1123 subdomain prefix and '/', "
                                "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))
    if not key and operator != "Exists":
        problems.append(("operator", "must be Exists when key is empty (a toleration of every taint)"))
    if operator == "Exists" and value:
        problems.append(("value", "must be empty when operator is Exists"))
    elif value and (len(value) > MAX_LABEL_LENGTH or not re.match(LABEL_VALUE, value)):
        problems.append(("value", f"{value!r} must be a label value: at most 63 letters, digits, '-', '_' or '.', "
                                  "starting and ending with a letter or digit"))
    if "tolerationSeconds" in toleration and toleration.get("effect") != "NoExecute":
        problems.append(("tolerationSeconds", "needs effect NoExecute (only a NoExecute taint evicts after a delay)"))
    return problems


def _checkpoint(fields: _Fields) -> CheckpointSpec:
    shared = fields.settings(CheckpointConfig)
    vol = fields.obj("volume")
    claim = vol.string("existingClaim", max_length=MAX_SUBDOMAIN_LENGTH, pattern=DNS_1123_SUBDOMAIN,
                       rule=RULE_SUBDOMAIN)
    size = vol.string("size", pattern=QUANTITY_PATTERN, max_length=64)
    volume = VolumeSpec(
        size=size or ("" if claim else DEFAULT_VOLUME_SIZE),
        storage_class_name=vol.string("storageClassName", max_length=MAX_SUBDOMAIN_LENGTH,
                                      pattern=DNS_1123_SUBDOMAIN, rule=RULE_SUBDOMAIN),
        existing_claim=claim,
        retain=vol.boolean("retain", VolumeSpec.retain),
    )
    vol.done()
    fields.done()
    if claim and size:
        vol.error("", "set either existingClaim or size, not both")
    return CheckpointSpec(**shared, volume=volume)


def _secret_key_ref(fields: _Fields, key: str) -> SecretKeyRef | None:
    """{name, key} of a Secret, both required when the object is given (the CRD's `required`)."""
    if not fields.has(key):
        fields.read.add(key)
        return None
    ref = fields.obj(key)
    name = ref.string("name", required=True, max_length=MAX_SUBDOMAIN_LENGTH, pattern=DNS_1123_SUBDOMAIN,
                      rule=RULE_SUBDOMAIN)
    item = ref.string("key", required=True, max_length=MAX_SUBDOMAIN_LENGTH, pattern=SECRET_KEY_PATTERN,
                      rule="a Secret key: letters, digits, '-', '_' and '.'")
    ref.done()
    return SecretKeyRef(name=name, key=item)


def _trackers(fields: _Fields) -> TrackersSpec:
    wandb, mlflow = fields.obj("wandb"), fields.obj("mlflow")
    spec = TrackersSpec(
        wandb=WandbSpec(**wandb.settings(WandbConfig), api_key_secret=_secret_key_ref(wandb, "apiKeySecret")),
        mlflow=MlflowSpec(**mlflow.settings(MlflowConfig), token_secret=_secret_key_ref(mlflow, "tokenSecret")),
    )
    wandb.done()
    mlflow.done()
    fields.done()
    return spec


def _scheduling(fields: _Fields) -> SchedulingSpec:
    scheduling = SchedulingSpec(
        gang_scheduler=fields.string("gangScheduler", enum=GANG_SCHEDULERS),
        queue=fields.string("queue", max_length=MAX_LABEL_LENGTH, pattern=QUEUE_NAME, rule=RULE_QUEUE),
        priority_class_name=fields.string("priorityClassName", max_length=MAX_SUBDOMAIN_LENGTH,
                                          pattern=DNS_1123_SUBDOMAIN, rule=RULE_SUBDOMAIN),
        gang_timeout_seconds=_seconds(fields, "gangTimeoutSeconds", SchedulingSpec.gang_timeout_seconds, minimum=1),
    )
    fields.done()
    return scheduling


def _scheduler_name_errors(scheduling: SchedulingSpec, job_template: PodTemplate,
                           roles: tuple[RoleSpec, ...]) -> list[tuple[str, str]]:
    """A gang scheduler named in the spec places the gang itself: a template may not pick another scheduler."""
    if scheduling.gang_scheduler in ("", "none"):
        return []
    templates = [("podTemplate", job_template)] + [(f"roles[{i}].podTemplate", r.pod_template)
                                                   for i, r in enumerate(roles)]
    return [(f"{path}.spec.schedulerName", f"must be unset with scheduling.gangScheduler "
                                           f"{scheduling.gang_scheduler}: its scheduler places the gang")
            for path, template in templates if "schedulerName" in template.spec]


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
    fields = {"replicas": "replicas", "processes_per_pod": "processesPerPod"}
    errors = [(f"roles[{i}].{fields[field]}", problem) for i, field, problem in layout.replica_problems(placed)
              if f"roles[{i}].{fields[field]}" not in bad]
    problem = layout.batch_problem(placed[index][1], batch_size)
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


def _gpu_mix_errors(roles: tuple[RoleSpec, ...], bad: set[str]) -> list[tuple[str, str]]:
    """Every role with pods has GPUs, or none has. The roles' processes exchange batches over one group, NCCL
    when a process sees a GPU and gloo when not (rlhf_trainer.bridge.Bridge.connect): a job mixing both would
    join that group from two backends and hang. A colocated role runs in its host's processes (no pods)."""
    with_pods = [(i, r) for i, r in enumerate(roles) if not r.colocate_with and f"roles[{i}].gpus" not in bad]
    if not with_pods:
        return []
    first = with_pods[0][1]
    return [
        (f"roles[{i}].gpus", f"is {role.gpus} on the {role.name} but {first.gpus} on the {first.name}: every role "
                             f"with pods needs GPUs or none does (the roles' processes join one NCCL group on GPUs, "
                             f"gloo on CPUs); give the {role.name} GPUs or colocateWith: {first.name}")
        for i, role in with_pods[1:] if (role.gpus > 0) != (first.gpus > 0)
    ]


def longest_pod_name(job_name: str, role: RoleSpec) -> str:
    """The longest pod name of a role with pods: `<job>-<role>-<replicas - 1>` (builders.pod_name)."""
    return f"{job_name}-{role.name}-{role.replicas - 1}"


def _job_name_errors(name: str, spec: JobSpec | None) -> list[tuple[str, str]]:
    """metadata.name names the headless Service (a DNS-1035 label) and starts every pod name, a hostname of
    at most 63 characters. `spec`: when it parsed, the rule is checked against each role's last pod."""
    if not re.match(DNS_1035_LABEL, name):
        return [("metadata.name", f"must be {RULE_DNS_1035} (got {name!r}): it names the job's headless Service")]
    if len(name) > MAX_JOB_NAME_LENGTH:
        return [("metadata.name", f"must be at most {MAX_JOB_NAME_LENGTH} characters (got {len(name)}): pod names "
                                  f"<job>-<role>-<index> are hostnames, at most 63 characters, and the first is "
                                  f"<job>-actor-0")]
    errors = []
    for role in spec.pod_roles() if spec is not None else ():
        longest = longest_pod_name(name, role)
        if len(longest) > MAX_LABEL_LENGTH:
            limit = MAX_LABEL_LENGTH - (len(longest) - len(name))
            errors.append(("metadata.name", f"must be at most {limit} characters with {role.replicas} {role.name} "
                                            f"replicas (got {len(name)}): pod names <job>-<role>-<index> are "
                                            f"hostnames, at most 63 characters, and {longest!r} has {len(longest)}"))
    return errors


def _self_source_errors(name: str, spec: JobSpec) -> list[tuple[str, str]]:
    """A job cannot start from its own export (the CRD's root rules say the same; longer cycles are the
    planner's: rlhf_operator.chain)."""
    return [(f"{key}.fromJob", "must name another RLHFJob, not this job itself")
            for key, source in spec.model_sources() if source.from_job == name]


def parse_job(obj: dict[str, Any], spec: JobSpec | None = None) -> Job:
    """An RLHFJob object (as the API returns it, or a manifest file) -> Job; SpecError if invalid.
    `spec`: the already parsed obj["spec"], when the caller has it (it is not parsed again)."""
    errors: list[tuple[str, str]] = []
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name")
    if spec is None:
        try:
            spec = parse_spec(obj.get("spec"))
        except SpecError as e:
            errors.extend(e.errors)
    if not isinstance(name, str) or not name:
        errors.insert(0, ("metadata.name", "is required"))
    else:
        errors[:0] = _job_name_errors(name, spec)
        if spec is not None:
            errors.extend(_self_source_errors(name, spec))
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


# Fields that cannot change after creation (the CRD's `self == oldSelf` rules say the same), with how to
# change them. Every other field is rolled out (a new gang from the last checkpoint: planner._roll_out) or
# applied in place (suspend, failurePolicy, deadlines, gangTimeoutSeconds): docs/spec.md "Spec edits".
_NEW_JOB = "create a new job to change it (deleting this one and creating it again with the same name resumes from " \
           "its retained checkpoint claim)"
IMMUTABLE_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (lambda s: s.model, "the checkpoints hold this model's weights; create a new job to train another model"),
    "rewardModel": (lambda s: s.reward_model, _NEW_JOB),
    "reward": (lambda s: s.reward, _NEW_JOB),
    "dataset": (lambda s: s.dataset, f"the checkpoints hold a position in it; {_NEW_JOB}"),
    "checkpoint.volume": (lambda s: s.checkpoint.volume,
                          "the job's checkpoints are on it; create a new job to use another volume"),
    "scheduling.gangScheduler": (lambda s: s.scheduling.gang_scheduler,
                                 "its PodGroup holds the gang; create a new job to use another scheduler"),
}


def immutable_changes(old_spec: dict[str, Any], new_spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, message) for every change to what cannot change after creation: the algorithm, the role
    layout (names and colocateWith) and IMMUTABLE_FIELDS (compared after defaulting; rewardModel only when
    both have one, as the CRD's rule on it). The CRD's `self == oldSelf` rules say the same."""
    if old_spec == new_spec:
        return []  # most passes: nothing edited, nothing parsed
    changes = []
    if old_spec.get("algorithm") != new_spec.get("algorithm"):
        changes.append(("algorithm", f"is immutable (was {old_spec.get('algorithm')!r}, "
                                     f"now {new_spec.get('algorithm')!r})"))
    old_layout, new_layout = _role_layout(old_spec), _role_layout(new_spec)
    if old_layout != new_layout:
        changes.append(("roles", f"role names and colocateWith are immutable (was {_describe(old_layout)}, "
                                 f"now {_describe(new_layout)})"))
    try:
        old, new = parse_spec(old_spec), parse_spec(new_spec)
    except SpecError:
        return changes  # an invalid edit is reported as such (InvalidSpec), field by field
    for path, (read, how) in IMMUTABLE_FIELDS.items():
        before, after = read(old), read(new)
        if path == "rewardModel" and (before is None or after is None):
            continue
        if before != after:
            changes.append((path, f"is immutable: {how}"))
    return changes


def _role_layout(spec: dict[str, Any]) -> dict[str, str]:
    roles = spec.get("roles") if isinstance(spec.get("roles"), list) else []
    return {str(r.get("name")): r.get("colocateWith") or "" for r in roles if isinstance(r, dict)}


def _describe(layout: dict[str, str]) -> str:
    return ", ".join(f"{name}->{host}" if host else name for name, host in sorted(layout.items())) or "none"
