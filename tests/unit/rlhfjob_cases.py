"""RLHFJob test cases shared by test_api.py (parse_spec) and test_crd.py (the CRD's schema + CEL), and the
CRD's schema as Draft 7 JSON Schema (to_json_schema; test_planner.py checks the statuses it plans).

A case is an example manifest from crds/examples/ with edits, written with the same paths as the
errors (`roles[1].replicas`), in tests/unit/cases/rlhfjob_invalid.yaml and rlhfjob_valid.yaml.
Cases about metadata (the job name) are in rlhfjob_invalid_metadata.yaml: the integration test that
applies rlhfjob_invalid.yaml renames every job, so they cannot live there.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "crds" / "examples"
CRD = ROOT / "crds" / "rlhfjobs.yaml"
CASES = Path(__file__).resolve().parent / "cases"

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@functools.cache
def crd() -> dict[str, Any]:
    """crds/rlhfjobs.yaml, parsed once (callers must not mutate it)."""
    return yaml.safe_load(CRD.read_text())


def status_schema() -> dict[str, Any]:
    """The CRD's status schema (OpenAPI v3, as the API server applies it to status writes)."""
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def example(name: str) -> dict[str, Any]:
    """crds/examples/NAME.yaml, or document I of a file of several jobs as NAME#I (example_names())."""
    stem, _, index = name.partition("#")
    docs = [d for d in yaml.safe_load_all((EXAMPLES / f"{stem}.yaml").read_text()) if d]
    if not index and len(docs) != 1:
        raise ValueError(f"{stem}.yaml holds {len(docs)} jobs: name one as {stem}#0 .. {stem}#{len(docs) - 1}")
    return docs[int(index or 0)]


def example_names() -> list[str]:
    """Every example job: FILE for a file of one job, FILE#I for each job of a pipeline file."""
    names = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        count = sum(1 for d in yaml.safe_load_all(path.read_text()) if d)
        names += [path.stem] if count == 1 else [f"{path.stem}#{i}" for i in range(count)]
    return names


def _steps(path: str) -> list[str | int]:
    return [key if key else int(index) for key, index in _STEP.findall(path)]


def set_path(obj: Any, path: str, value: Any) -> None:
    *parents, last = _steps(path)
    for step in parents:
        obj = obj[step]
    if isinstance(obj, list) and last == len(obj):
        obj.append(value)  # roles[3] on three roles adds a fourth
    else:
        obj[last] = value


def get_path(obj: Any, path: str) -> Any:
    """The value at `path` (`roles[1].replicas`); KeyError / IndexError when it is not there."""
    for step in _steps(path):
        obj = obj[step]
    return obj


def unset_path(obj: Any, path: str) -> None:
    *parents, last = _steps(path)
    for step in parents:
        obj = obj[step]
    del obj[last]


def build(case: dict[str, Any]) -> dict[str, Any]:
    """The whole manifest of a case: its base example with `set` and `unset` applied to spec, and
    `name` (if given) as metadata.name."""
    manifest = copy.deepcopy(example(case["base"]))
    if "name" in case:
        manifest["metadata"]["name"] = case["name"]
    for path, value in (case.get("set") or {}).items():
        set_path(manifest["spec"], path, copy.deepcopy(value))
    for path in case.get("unset") or []:
        unset_path(manifest["spec"], path)
    return manifest


def load(name: str) -> list[dict[str, Any]]:
    return yaml.safe_load((CASES / name).read_text())


def params(name: str) -> list[Any]:
    import pytest

    return [pytest.param(case, id=case["id"]) for case in load(name)]


def related(a: str, b: str) -> bool:
    """One error path lies inside the other (`roles` and `roles[1].colocateWith`, `` and anything):
    the API server and parse_spec may name a field or the object holding it."""
    short, long = sorted((a, b), key=len)
    return not short or long == short or long.startswith((short + ".", short + "["))


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural) -> Draft 7: drop x-kubernetes-*, int-or-string as anyOf, and reject
    unknown properties wherever the CRD does not preserve them."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out
