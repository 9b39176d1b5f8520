"""What the contract generates: the CRD's schema for the shared fields and docs/spec.md's tables.

`scripts/gen_contract.py` rewrites the blocks between marker lines in crds/rlhfjobs.yaml (and the
chart's copy) and docs/spec.md; tests/unit/test_contract.py fails when a committed file differs from
what render_crd() / render_doc() make of it, so CI catches a knob changed without regenerating.

    # >>> generated: hyperparameters (scripts/gen_contract.py)     <- in the YAML, at the keys' indent
    # <<< generated: hyperparameters
    <!-- >>> generated: hyperparameters (scripts/gen_contract.py) -->   <- in Markdown
    <!-- <<< generated: hyperparameters -->
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from rlhf_contract import algorithms
from rlhf_contract.algorithms import NAMES, ONLINE, PAIR_ALGORITHMS, TABLE
from rlhf_contract.config import (
    FORMATS_FOR_PAIRS,
    MULTI_TURN,
    SYNTHETIC_PREFIX,
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
    WandbConfig,
)
from rlhf_contract.knobs import Setting, format_number, settings_of

# ---- OpenAPI schema of knobs -------------------------------------------------------------------


def _applies(setting: Setting) -> str:
    algs = setting.knob.algorithms
    return f"{', '.join(algs)}: " if algs else ""


def schema_of(setting: Setting) -> dict[str, Any]:
    """The CRD's schema node of one knob: type, description, default, bounds, enum, CEL for strict bounds."""
    k = setting.knob
    node: dict[str, Any] = {"type": setting.json_type, "description": _applies(setting) + k.doc}
    # "" is "unset" (no default in the CRD, so `has()` in CEL rules means "given").
    if not setting.required and k.crd_default and setting.default != "" and not setting.unset_marker():
        node["default"] = setting.default
    if k.enum:
        node["enum"] = list(k.enum)
    if setting.required and setting.type is str:
        node["minLength"] = 1
    if k.max_length:
        node["maxLength"] = k.max_length
    for key, bound in (("minimum", k.minimum), ("maximum", k.maximum)):
        if bound is not None:
            node[key] = bound
    rules = []
    if k.gt is not None:
        rules.append({"rule": f"self > {float(k.gt)}", "message": f"must be > {format_number(k.gt)}"})
    if k.lt is not None:
        rules.append({"rule": f"self < {float(k.lt)}", "message": f"must be < {format_number(k.lt)}"})
    if k.rule is not None:
        rules.append({"rule": k.rule.cel, "message": k.rule.message})
    if rules:
        node["x-kubernetes-validations"] = rules
    return node


def properties_of(cls: type) -> dict[str, Any]:
    return {s.camel: schema_of(s) for s in settings_of(cls)}


# ---- the CRD's algorithm rules, derived from the algorithm table ---------------------------------


def _cel_list(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


def _words(names: tuple[str, ...], last: str = "and") -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def _needing(role: str) -> tuple[str, ...]:
    return tuple(a.name for a in TABLE if role in a.roles)


def cel_ranks(role: str) -> str:
    """CEL for the ranks of the role item `role`: replicas x processesPerPod, where an unset
    processesPerPod is gpus when > 0, else 1 (layout.Placement.ranks; rlhf_operator.api._role)."""
    per_pod = f"(has({role}.processesPerPod) ? {role}.processesPerPod : (has({role}.gpus) && {role}.gpus > 0 ? {role}.gpus : 1))"
    return f"{role}.replicas * {per_pod}"


def algorithm_rules() -> list[dict[str, str]]:
    """The spec-level CEL rules: roles per algorithm, the reward model, the batch split, pair formats.
    Their Python twins: algorithms.role_set_problem, layout.batch_problem, config.dataset_format_problem,
    config.turns_problem."""
    rules = [{"rule": "self.roles.exists(r, r.name == 'actor')",
              "message": "roles must include actor (every algorithm trains an actor)", "fieldPath": ".roles"}]
    for role in algorithms.ROLE_NAMES[1:]:
        if role == "reward":
            continue
        algs = _needing(role)
        which = f"algorithm {algs[0]}, and only for {algs[0]}" if len(algs) == 1 else \
            f"algorithms {_words(algs)}, and only for them"
        rules.append({"rule": f"self.roles.exists(r, r.name == '{role}') == (self.algorithm in {_cel_list(algs)})",
                      "message": f"roles must include {role} for {which}", "fieldPath": ".roles"})
    model_reward = (f"self.algorithm in {_cel_list(ONLINE)} && "
                    f"self.reward.type in {_cel_list(algorithms.MODEL_REWARD_TYPES)}")
    types = _words(algorithms.MODEL_REWARD_TYPES, "or")
    rules += [
        {"rule": f"self.roles.exists(r, r.name == 'reward') == ({model_reward})",
         "message": f"roles must include reward when the algorithm is {_words(ONLINE, 'or')} and reward.type is "
                    f"{types}, and only then", "fieldPath": ".roles"},
        {"rule": f"!({model_reward}) || has(self.rewardModel)",
         "message": f"rewardModel is required when reward.type is {types} (algorithms {', '.join(ONLINE)})",
         "fieldPath": ".rewardModel"},
        {"rule": "!has(self.roles) || !self.roles.exists(a, a.name == 'actor' && a.replicas >= 1 && "
                 "(!has(a.processesPerPod) || a.processesPerPod >= 1) && "
                 f"self.hyperparameters.batchSize % ({cel_ranks('a')}) != 0)",
         "message": "hyperparameters.batchSize must be divisible by the actor's ranks (replicas x processesPerPod): "
                    "every actor rank takes an equal share", "fieldPath": ".hyperparameters.batchSize"},
        {"rule": f"!(self.algorithm in {_cel_list(PAIR_ALGORITHMS)}) || !has(self.dataset) || "
                 f"!has(self.dataset.path) || self.dataset.path.startsWith('{SYNTHETIC_PREFIX}') || "
                 f"self.dataset.format in {_cel_list(FORMATS_FOR_PAIRS)}",
         "message": f"dataset.format must be one of {', '.join(FORMATS_FOR_PAIRS)} for algorithms "
                    f"{_words(PAIR_ALGORITHMS)}, which learn from preference pairs", "fieldPath": ".dataset.format"},
        {"rule": "!(self.algorithm == 'ppo' && has(self.critic) && has(self.critic.model) && "
                 f"self.critic.model == 'reward') || self.reward.type in {_cel_list(algorithms.MODEL_REWARD_TYPES)}",
         "message": f"critic.model reward needs a reward model (reward.type {types}); use policy or a model folder",
         "fieldPath": ".critic.model"},
        {"rule": "!has(self.hyperparameters) || !has(self.hyperparameters.selfCorrection) || "
                 "self.hyperparameters.selfCorrection != 'score' || "
                 "(has(self.hyperparameters.turns) && self.hyperparameters.turns == 2)",
         "message": "hyperparameters.turns must be 2 with selfCorrection score (two attempts)",
         "fieldPath": ".hyperparameters.turns"},
        {"rule": "!has(self.hyperparameters) || !has(self.hyperparameters.turns) || self.hyperparameters.turns == 1 "
                 f"|| (self.algorithm in {_cel_list(MULTI_TURN)} && self.reward.type != 'prm')",
         "message": f"hyperparameters.turns above 1 needs algorithm {_words(MULTI_TURN, 'or')} (multi-turn "
                    "rollouts) and a reward.type other than prm (a process reward model scores one response)",
         "fieldPath": ".hyperparameters.turns"},
    ]
    return rules


# ---- the blocks ------------------------------------------------------------------------------------

CRD_BLOCKS: dict[str, Callable[[], dict[str, Any]]] = {
    "spec-rules": lambda: {"x-kubernetes-validations": algorithm_rules()},
    "algorithm": lambda: {"algorithm": {
        "type": "string", "description": "Training algorithm; decides the roles (docs/spec.md). Immutable.",
        "enum": list(NAMES), "maxLength": 16,
        "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "algorithm is immutable"}]}},
    "model": lambda: properties_of(ModelConfig),
    "reward": lambda: properties_of(RewardConfig),
    "dataset": lambda: properties_of(DatasetConfig),
    "dataset-fields": lambda: properties_of(DatasetFields),
    "role": lambda: properties_of(RoleConfig),
    "deepspeed": lambda: properties_of(DeepSpeedConfig),
    "lora": lambda: properties_of(LoraConfig),
    "hyperparameters": lambda: properties_of(Hyperparameters),
    "checkpoint": lambda: properties_of(CheckpointConfig),
    "critic": lambda: properties_of(CriticConfig),
    "trackers-wandb": lambda: properties_of(WandbConfig),
    "trackers-mlflow": lambda: properties_of(MlflowConfig),
}


def _cell(value: Any) -> str:
    return "" if value is None else f"`{json.dumps(value)}`"


def _bounds(setting: Setting) -> str:
    k = setting.knob
    parts = [f">= {format_number(k.minimum)}" if k.minimum is not None else "",
             f"> {format_number(k.gt)}" if k.gt is not None else "",
             f"<= {format_number(k.maximum)}" if k.maximum is not None else "",
             f"< {format_number(k.lt)}" if k.lt is not None else "",
             " \\| ".join(k.enum), k.rule.message.removeprefix("must be ") if k.rule else ""]
    return ", ".join(p for p in parts if p)


def hyperparameter_table() -> str:
    rows = ["| field | type | default | allowed | algorithms | meaning |", "|---|---|---|---|---|---|"]
    for s in settings_of(Hyperparameters):
        rows.append(f"| `{s.camel}` | {s.json_type} | {_cell(s.default)} | {_bounds(s)} | "
                    f"{', '.join(s.knob.algorithms) or 'all'} | {s.knob.doc} |")
    return "\n".join(rows)


def lora_table() -> str:
    """roles[].lora's fields (LoraConfig), one row each."""
    rows = ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{s.camel}` | {s.json_type} | {_cell(s.default)} | {_bounds(s)} | {s.knob.doc} |"
             for s in settings_of(LoraConfig)]
    return "\n".join(rows)


def algorithm_table() -> str:
    rows = ["| algorithm | roles | data | trainer module | what |", "|---|---|---|---|---|"]
    for a in TABLE:
        roles = ", ".join(a.roles) + (", (+ reward when `reward.type` is model)" if a.online else "")
        rows.append(f"| {a.name} | {roles} | {a.data} | `rlhf_trainer.algorithms.{a.module}` | {a.summary} |")
    return "\n".join(rows)


DOC_BLOCKS: dict[str, Callable[[], str]] = {
    "algorithms": algorithm_table,
    "hyperparameters": hyperparameter_table,
    "lora": lora_table,
}


# ---- YAML text (a tiny emitter: the CRD's style, stdlib only) ---------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        # YAML 1.1 (PyYAML) reads "1e-05" as a string: a float needs a dot in its mantissa.
        return (mantissa if "." in mantissa else mantissa + ".0") + (e + exponent if e else "")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if _PLAIN.match(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value)


# Strings written without quotes: identifiers that YAML reads back as the same string.
_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}


def yaml_lines(mapping: dict[str, Any], indent: int) -> list[str]:
    """A mapping as block YAML at `indent` spaces; lists of mappings as `- ` items at the key's indent."""
    pad, lines = " " * indent, []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines += yaml_lines(value, indent + 2)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for item in value:
                item_lines = yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {item_lines[0].lstrip()}")
                lines += item_lines[1:]
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


# ---- replacing marked blocks -------------------------------------------------------------------------

_YAML_MARK = re.compile(r"^( *)# >>> generated: ([\w-]+) \(scripts/gen_contract.py\)$")
_DOC_MARK = re.compile(r"^<!-- >>> generated: ([\w-]+) \(scripts/gen_contract.py\) -->$")


class MarkerError(ValueError):
    """A file lacks a block's begin or end marker, or names an unknown block."""


def _replace(text: str, begin: re.Pattern[str], end: Callable[[str, str], str],
             body: Callable[[str, str], list[str]], blocks: dict[str, Any], where: str) -> str:
    lines, out, i, seen = text.split("\n"), [], 0, set()
    while i < len(lines):
        out.append(lines[i])
        match = begin.match(lines[i])
        i += 1
        if not match:
            continue
        indent, name = (match.group(1), match.group(2)) if match.re.groups == 2 else ("", match.group(1))
        if name not in blocks:
            raise MarkerError(f"{where}: unknown generated block {name!r} (known: {', '.join(blocks)})")
        closing = end(indent, name)
        try:
            stop = lines.index(closing, i)
        except ValueError:
            raise MarkerError(f"{where}: no line {closing.strip()!r} after the {name!r} block") from None
        out += body(indent, name)
        out.append(closing)
        seen.add(name)
        i = stop + 1
    missing = sorted(set(blocks) - seen)
    if missing:
        raise MarkerError(f"{where}: no generated block(s) {', '.join(missing)}")
    return "\n".join(out)


def render_crd(text: str, where: str = "crds/rlhfjobs.yaml") -> str:
    """The CRD's text with every generated block rewritten from the contract."""
    return _replace(text, _YAML_MARK, lambda indent, name: f"{indent}# <<< generated: {name}",
                    lambda indent, name: yaml_lines(CRD_BLOCKS[name](), len(indent)), CRD_BLOCKS, where)


def render_doc(text: str, where: str = "docs/spec.md") -> str:
    """docs/spec.md with its generated tables rewritten from the contract."""
    return _replace(text, _DOC_MARK, lambda _indent, name: f"<!-- <<< generated: {name} -->",
                    lambda _indent, name: DOC_BLOCKS[name]().split("\n"), DOC_BLOCKS, where)
