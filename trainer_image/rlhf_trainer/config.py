"""The trainer config (`$RLHF_CONFIG`, docs/spec.md "Trainer config JSON") as typed dataclasses.

    cfg = load_config(os.environ["RLHF_CONFIG"])
    cfg.hyperparameters.clip_range, cfg.roles["actor"].deepspeed.zero_stage

The operator renders the RLHFJob spec with snake_case keys and roles as a map. Parsing is strict:
an unknown key, a wrong type or a value out of range raises ConfigError naming every bad field by
path (`hyperparameters.clip_range: expected a number`), because a typo silently falling back to a
default would train the wrong thing for hours. Hyperparameter names and defaults are the same as
rlhf_operator.api.Hyperparameters (a contract test compares them; the trainer cannot import it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_trainer.errors import ConfigError

ALGORITHMS = ("ppo", "grpo", "rloo", "dpo", "rm", "sft")
ROLE_NAMES = ("actor", "critic", "reward", "reference")
REWARD_TYPES = ("model", "rule")
REWARD_RULES = ("exact_match", "regex", "callable")
DATASET_FORMATS = ("prompts", "pairs", "instruction", "ranked", "pair_list")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k3")
NON_FINITE_POLICIES = ("fail", "skip")
# Algorithms that sample responses and score them (the others learn from fixed data).
ONLINE_ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from: an HF folder inside the container, or `tiny://llama|qwen2`."""

    path: str


@dataclass(frozen=True)
class RewardConfig:
    """How responses are scored (ppo/grpo/rloo): a reward model role, or a rule run by the actor."""

    type: str = "model"  # model | rule
    rule: str = ""  # exact_match | regex | callable, when type == rule
    pattern: str = ""  # the regex rule's pattern (re.search on the response)
    callable: str = ""  # "module:function" for the callable rule


@dataclass(frozen=True)
class DatasetConfig:
    """Training data: a JSONL file or `synthetic://NAME`, in one of DATASET_FORMATS."""

    path: str
    format: str = "prompts"
    eval_path: str = ""  # optional held-out JSONL in the same format


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 2  # 0..3
    bf16: bool = False
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class RoleConfig:
    """One role's process world: how many ranks, and where it runs if colocated."""

    replicas: int = 1
    colocate_with: str = ""  # host role whose processes also serve this role; "" = own pods
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass(frozen=True)
class Hyperparameters:
    """Every training knob; names and defaults match the RLHFJob spec (camelCase there)."""

    max_steps: int = 20  # optimizer steps of the whole job
    learning_rate: float = 1e-5
    batch_size: int = 8  # prompts (or pairs) per step, global
    micro_batch_size: int = 4  # per process per forward/backward
    max_prompt_length: int = 64  # tokens; longer prompts are truncated from the left
    max_new_tokens: int = 16  # response length cap when sampling
    temperature: float = 1.0  # sampling temperature (also used to scale logits for log-probs)
    seed: int = 0
    # ppo
    ppo_epochs: int = 1  # passes over each rollout batch
    clip_range: float = 0.2  # PPO ratio clip epsilon
    dual_clip: float = 0.0  # 0 = off, else c > 1: bound on the loss for negative advantages
    value_clip_range: float = 0.2  # critic clip around old values; 0 = no clipping
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial KL penalty coefficient
    kl_target: float = 0.0  # 0 = fixed controller, > 0 = adaptive controller target
    kl_horizon: int = 10000  # adaptive controller horizon (Ziegler et al. 2019)
    kl_estimator: str = "k1"  # k1 | k3 (Schulman, "Approximating KL divergence")
    reward_clip: float = 10.0  # scores are clipped to [-x, x]
    truncation_penalty: float = 1.0  # taken off the score of a response with no EOS (TRL: missing_eos_penalty)
    whiten_advantages: bool = True
    # grpo / rloo
    group_size: int = 4  # samples per prompt
    # dpo
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # cDPO: assumed probability that a pair's label is flipped
    # rm
    margin: float = 0.0  # Bradley-Terry margin (Llama 2)
    # sft
    packing: bool = False  # pack several examples into one row
    # all
    non_finite: str = "fail"  # fail | skip: a NaN / inf reward, loss or gradient norm (rlhf_trainer.finite)


@dataclass(frozen=True)
class CheckpointConfig:
    interval_steps: int = 10  # save every N steps (and at the end)
    keep: int = 3  # complete checkpoints kept


@dataclass(frozen=True)
class TrainerConfig:
    """The whole job as the trainer sees it."""

    job: str
    algorithm: str
    model: ModelConfig
    dataset: DatasetConfig
    roles: dict[str, RoleConfig]
    namespace: str = "default"
    reward_model: ModelConfig | None = None
    reward: RewardConfig = field(default_factory=RewardConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def colocated_into(self, host: str) -> tuple[str, ...]:
        """Roles served inside `host`'s processes."""
        return tuple(name for name, role in self.roles.items() if role.colocate_with == host)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form parse_config() reads back (handy for tests and the local runner)."""
        return dataclasses.asdict(self)


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
    if algorithm in ONLINE_ALGORITHMS and reward_type == "model":
        return (*base, "reward")
    return base


# ---- parsing: structure and types ----------------------------------------------------------

_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _is_type(value: Any, expected: type) -> bool:
    # bool is an int subclass in Python; JSON true must not pass as 1 (nor 1 as true). A float
    # field takes integers too (JSON writes 1e-05 but also 1).
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _check_scalar(value: Any, expected: type, path: str, errors: list[str]) -> Any:
    if not _is_type(value, expected):
        errors.append(f"{path}: expected {_TYPE_WORDS[expected]}, got {json.dumps(value)}")
        return None
    return float(value) if expected is float else value


def _parse_value(value: Any, hint: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # only `X | None` occurs
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _parse_value(value, inner, path, errors)
    if origin is dict:
        _, item_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object, got {json.dumps(value)}")
            return {}
        return {k: _parse_value(v, item_hint, f"{path}.{k}", errors) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _parse_dataclass(value, hint, path, errors)
    return _check_scalar(value, hint, path, errors)


def _parse_dataclass(data: Any, cls: type, path: str, errors: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        errors.append(f"{path or 'config'}: expected an object, got {json.dumps(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"allowed: {', '.join(fields)}"
            errors.append(f"{prefix}{key}: unknown field ({hint})")
    kwargs, missing = {}, False
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _parse_value(data[name], hints[name], prefix + name, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required")
            missing = True
    # With a bad field inside, the object still builds (values are not type-checked by
    # dataclasses), so parsing goes on and reports sibling errors too.
    return None if missing else cls(**kwargs)


# ---- parsing: values and cross-field rules ---------------------------------------------------

# (field, predicate, what the value must be): checked after the types are right.
_HYPERPARAMETER_RULES: tuple[tuple[str, typing.Callable[[Any], bool], str], ...] = (
    ("max_steps", lambda v: v >= 1, "at least 1"),
    ("learning_rate", lambda v: v > 0, "greater than 0"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("micro_batch_size", lambda v: v >= 1, "at least 1"),
    ("max_prompt_length", lambda v: v >= 1, "at least 1"),
    ("max_new_tokens", lambda v: v >= 1, "at least 1"),
    ("temperature", lambda v: v > 0, "greater than 0"),
    ("seed", lambda v: v >= 0, "at least 0"),
    ("ppo_epochs", lambda v: v >= 1, "at least 1"),
    ("clip_range", lambda v: v > 0, "greater than 0"),
    ("dual_clip", lambda v: v == 0 or v > 1, "0 (off) or greater than 1"),
    ("value_clip_range", lambda v: v >= 0, "at least 0"),
    ("vf_coef", lambda v: v >= 0, "at least 0"),
    ("gamma", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("lam", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("kl_coef", lambda v: v >= 0, "at least 0"),
    ("kl_target", lambda v: v >= 0, "at least 0 (0 = fixed KL coefficient)"),
    ("kl_horizon", lambda v: v >= 1, "at least 1"),
    ("kl_estimator", lambda v: v in KL_ESTIMATORS, f"one of {', '.join(KL_ESTIMATORS)}"),
    ("reward_clip", lambda v: v > 0, "greater than 0"),
    ("truncation_penalty", lambda v: v >= 0, "at least 0"),
    ("group_size", lambda v: v >= 2, "at least 2"),
    ("beta", lambda v: v > 0, "greater than 0"),
    ("loss_type", lambda v: v in LOSS_TYPES, f"one of {', '.join(LOSS_TYPES)}"),
    ("label_smoothing", lambda v: 0 <= v < 0.5, "at least 0 and less than 0.5"),
    ("margin", lambda v: v >= 0, "at least 0"),
    ("non_finite", lambda v: v in NON_FINITE_POLICIES, f"one of {', '.join(NON_FINITE_POLICIES)}"),
)


def _enum(path: str, value: str, allowed: tuple[str, ...], errors: list[str]) -> None:
    if value not in allowed:
        errors.append(f"{path}: {json.dumps(value)} is not one of {', '.join(allowed)}")


def _check_values(cfg: TrainerConfig, errors: list[str]) -> None:
    _enum("algorithm", cfg.algorithm, ALGORITHMS, errors)
    _enum("dataset.format", cfg.dataset.format, DATASET_FORMATS, errors)
    if not cfg.model.path:
        errors.append("model.path: must not be empty")
    if not cfg.dataset.path:
        errors.append("dataset.path: must not be empty")
    hp = cfg.hyperparameters
    for name, ok, must_be in _HYPERPARAMETER_RULES:
        value = getattr(hp, name)
        if not ok(value):
            errors.append(f"hyperparameters.{name}: must be {must_be}, got {json.dumps(value)}")
    if cfg.checkpoint.interval_steps < 1:
        errors.append("checkpoint.interval_steps: must be at least 1")
    if cfg.checkpoint.keep < 1:
        errors.append("checkpoint.keep: must be at least 1")
    _check_reward(cfg, errors)
    _check_roles(cfg, errors)


def _check_reward(cfg: TrainerConfig, errors: list[str]) -> None:
    reward = cfg.reward
    _enum("reward.type", reward.type, REWARD_TYPES, errors)
    if reward.type == "rule":
        _enum("reward.rule", reward.rule, REWARD_RULES, errors)
        if reward.rule == "regex" and not reward.pattern:
            errors.append("reward.pattern: required when reward.rule is regex")
        if reward.rule == "callable" and reward.callable.count(":") != 1:
            errors.append(f"reward.callable: expected \"module:function\", got {json.dumps(reward.callable)}")
    needs_model = cfg.algorithm in ONLINE_ALGORITHMS and reward.type == "model"
    if needs_model and (cfg.reward_model is None or not cfg.reward_model.path):
        errors.append("reward_model.path: required when reward.type is model")


def _check_roles(cfg: TrainerConfig, errors: list[str]) -> None:
    for name, role in cfg.roles.items():
        _enum(f"roles.{name}", name, ROLE_NAMES, errors)
        if role.replicas < 1:
            errors.append(f"roles.{name}.replicas: must be at least 1")
        if not 0 <= role.deepspeed.zero_stage <= 3:
            errors.append(f"roles.{name}.deepspeed.zero_stage: must be 0..3, got {role.deepspeed.zero_stage}")
        host = role.colocate_with
        if host and (host == name or host not in cfg.roles or cfg.roles[host].colocate_with):
            errors.append(f"roles.{name}.colocate_with: {json.dumps(host)} is not another role with pods of its own")
    if cfg.algorithm in ALGORITHMS and cfg.reward.type in REWARD_TYPES:
        want = required_roles(cfg.algorithm, cfg.reward.type)
        if set(cfg.roles) != set(want):
            errors.append(
                f"roles: {cfg.algorithm} with a {cfg.reward.type} reward needs roles {', '.join(want)}; "
                f"got {', '.join(cfg.roles) or 'none'}"
            )


def parse_config(data: dict[str, Any]) -> TrainerConfig:
    """Validate the config dict and return a TrainerConfig; ConfigError lists every bad field."""
    errors: list[str] = []
    cfg = _parse_dataclass(data, TrainerConfig, "", errors)
    if not errors:
        _check_values(cfg, errors)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def load_config(path: str | Path) -> TrainerConfig:
    """Read and parse a config JSON file; unreadable or invalid JSON names the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the trainer config: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
