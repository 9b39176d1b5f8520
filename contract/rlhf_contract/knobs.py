"""Typed settings fields ("knobs"): a dataclass field that carries its bounds, allowed values, the
algorithms it applies to and a one-line doc, so each knob is written once (docs/contract.md).

    @dataclass(frozen=True)
    class Hyperparameters:
        clip_range: float = knob(0.2, "policy ratio clip epsilon.", gt=0, algorithms=("ppo",))

The field's Python name is the snake_case key of the trainer config JSON; its camelCase spelling is
the manifest key. From the same fields come: the operator's parse_spec() checks, the trainer
config's checks, the CRD's schema (rlhf_contract.generate) and docs/spec.md's tables.

Bounds: `minimum` / `maximum` are inclusive (schema keywords in the CRD), `gt` / `lt` strict (CEL
rules in the CRD); `rule` is a check no bound can say, with its CEL twin.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A knob's Python type -> its JSON / OpenAPI type name.
JSON_TYPES: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class Rule:
    """A value check that no bound expresses: `check(value)` in Python, `cel` on `self` in the CRD."""

    check: Callable[[Any], bool]
    cel: str
    message: str  # "must be 0 (off) or > 1": the same words on both sides


@dataclass(frozen=True)
class Knob:
    """What a field's metadata says about it (see the module docstring)."""

    doc: str
    algorithms: tuple[str, ...] = ()  # () = every algorithm
    minimum: float | None = None
    maximum: float | None = None
    gt: float | None = None
    lt: float | None = None
    enum: tuple[str, ...] = ()
    max_length: int = 0
    rule: Rule | None = None
    # False: the CRD declares no default (the default depends on other fields, e.g. zeroStage per role).
    crd_default: bool = True

    def problems(self, value: Any) -> list[str]:
        """Every way a value of the right type breaks this knob's rules ([] = valid).

        Messages read "must be >= 1 (got 0)" (the value as given); callers put the field path in front.
        """
        if self.enum and value not in self.enum:
            return [f"must be one of: {', '.join(self.enum)} (got {value!r})"]
        if self.max_length and isinstance(value, str) and len(value) > self.max_length:
            return [f"must be at most {self.max_length} characters (got {len(value)})"]
        checks = [(">=", self.minimum, self.minimum is not None and value < self.minimum),
                  ("<=", self.maximum, self.maximum is not None and value > self.maximum),
                  (">", self.gt, self.gt is not None and value <= self.gt),
                  ("<", self.lt, self.lt is not None and value >= self.lt)]
        problems = [f"must be {op} {format_number(bound)} (got {value})" for op, bound, failed in checks if failed]
        if not problems and self.rule is not None and not self.rule.check(value):
            problems.append(f"{self.rule.message} (got {value})")
        return problems


def knob(default: Any = dataclasses.MISSING, doc: str = "", **meta: Any) -> Any:
    """A dataclass field with a Knob in its metadata; no default = required."""
    return dataclasses.field(default=default, metadata={"knob": Knob(doc, **meta)})


def camel_case(snake: str) -> str:
    """`max_new_tokens` -> `maxNewTokens` (config key -> manifest key)."""
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclass(frozen=True)
class Setting:
    """One knob field of a dataclass, resolved: name, type, default, Knob."""

    name: str
    type: type
    default: Any
    knob: Knob
    camel: str = ""  # the manifest's spelling of `name`; settings_of() fills it in

    def __post_init__(self) -> None:
        if not self.camel:
            object.__setattr__(self, "camel", camel_case(self.name))

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def json_type(self) -> str:
        return JSON_TYPES[self.type]

    def applies_to(self, algorithm: str) -> bool:
        return not self.knob.algorithms or algorithm in self.knob.algorithms

    def problems(self, value: Any) -> list[str]:
        return self.knob.problems(value)

    def unset_marker(self) -> bool:
        """True when the default is outside the enum: it means "unset" (reward.rule "" = no rule)."""
        return bool(self.knob.enum) and self.default not in self.knob.enum


def format_number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The knob fields of a dataclass, in declaration order (fields without a Knob are skipped).
    Cached per class: resolving the annotations is most of a parse's cost otherwise."""
    hints = typing.get_type_hints(cls)
    return tuple(
        Setting(f.name, hints[f.name], f.default, f.metadata["knob"])
        for f in dataclasses.fields(cls) if "knob" in f.metadata
    )
