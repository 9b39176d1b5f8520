"""The typed RLHFJob: spec and status dataclasses, and parse_spec() (docs/spec.md).

parse_spec() enforces the same rules as the CRD's schema and CEL rules, so the local runner (which
has no API server) rejects exactly what a cluster rejects, with every bad field named at once.
"""

from __future__ import annotations

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
    """Every problem of a spec at once; each entry is (field path, message)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"spec.{path}: {msg}" for path, msg in errors))


def parse_spec(spec: dict[str, Any]) -> JobSpec:
    """Validate a raw `spec` dict (camelCase, as in the manifest) and return a JobSpec.

    Raises SpecError listing every bad field by path (e.g. `roles[1].replicas`) with the allowed
    values, applying the same defaults, enums, minimums and CEL rules as crds/rlhfjobs.yaml.
    """
    raise NotImplementedError  # implemented with the CRD (issue 2, part 3)
