"""The Grafana dashboard against Grafana's own dashboard schema.

No JSON Schema of Grafana dashboards is published on PyPI or npm: Grafana keeps the schema in CUE
and publishes it as TypeScript types generated from it (`@grafana/schema`, versioned with Grafana;
the `Dashboard` type is the JSON model a dashboard file holds). The test writes the dashboard's JSON
as a TypeScript object literal that `satisfies` that type and runs the TypeScript compiler: a wrong
type, a missing required field or an unknown field (object literals get excess-property checks) is
an error naming the line. Installed by scripts/install.sh into tests/grafana/node_modules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "charts" / "rlhf-operator" / "dashboards").glob("*.json"))
NODE_DIR = REPO / "tests" / "grafana"
TSC = NODE_DIR / "node_modules" / ".bin" / "tsc"
# A string enum of the types (ThresholdsMode.Absolute = "absolute") is written as its value in JSON;
# Json<T> maps every enum to its values' union, and keeps the rest of the type as it is.
HEADER = """import type { Dashboard } from "@grafana/schema";

type Json<T> = T extends string ? `${T}` : T extends number | boolean | null | undefined ? T
  : T extends readonly (infer U)[] ? Json<U>[] : T extends object ? { [K in keyof T]: Json<T[K]> } : T;

export const dashboard = """

pytestmark = pytest.mark.skipif(not TSC.exists() or shutil.which("node") is None,
                                reason="no tests/grafana/node_modules: run scripts/install.sh")


def type_errors(boards: dict[str, dict], workdir: Path) -> dict[str, list[str]]:
    """file name -> tsc's errors (`(line,col): error TSxxxx: ...`) of each dashboard checked as a Dashboard."""
    for name, board in boards.items():
        (workdir / f"{name}.ts").write_text(HEADER + json.dumps(board, indent=2) + " satisfies Json<Dashboard>;\n")
    # Type roots and module resolution from tests/grafana, where @grafana/schema is installed.
    (workdir / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "target": "es2022", "module": "esnext",
                            "moduleResolution": "bundler", "baseUrl": str(NODE_DIR),
                            "paths": {"@grafana/schema": [str(NODE_DIR / "node_modules" / "@grafana" / "schema")]}},
        "files": [f"{name}.ts" for name in boards]}))
    done = subprocess.run([str(TSC), "-p", str(workdir / "tsconfig.json")], capture_output=True, text=True,
                          timeout=600, cwd=workdir)
    errors: dict[str, list[str]] = {name: [] for name in boards}
    for line in done.stdout.splitlines():
        match = re.match(r"(?:.*/)?([\w.-]+)\.ts(\(\d+,\d+\): error .*)", line)
        if match and match.group(1) in errors:
            errors[match.group(1)].append(match.group(2))
    assert done.returncode == 0 or any(errors.values()), done.stdout + done.stderr  # tsc itself failed
    return errors


def broken_copies(board: dict) -> dict[str, dict]:
    """One fault each (tsc reports one error per object literal): name -> dashboard."""
    wrong_type, unknown, missing = (json.loads(json.dumps(board)) for _ in range(3))
    wrong_type["panels"][0]["gridPos"]["h"] = "8"   # a string where the schema has a number
    unknown["refreshEvery"] = "5s"                  # a field the schema does not have
    del missing["panels"][0]["gridPos"]["w"]        # a required field
    return {"wrong_type": wrong_type, "unknown": unknown, "missing": missing}


def test_the_dashboards_satisfy_grafanas_dashboard_type_and_broken_ones_do_not(tmp_path):
    boards = {path.stem: json.loads(path.read_text()) for path in DASHBOARDS}
    assert boards, "no dashboard JSON in the chart"
    broken = broken_copies(next(iter(boards.values())))
    errors = type_errors({**boards, **broken}, tmp_path)
    for name in boards:
        assert errors[name] == [], f"{name}.json against @grafana/schema's Dashboard:\n" + "\n".join(errors[name])
    assert [e.split(": ", 1)[1] for e in errors["wrong_type"]] == [
        "error TS2322: Type 'string' is not assignable to type 'number'."]
    assert len(errors["unknown"]) == 1 and "'\"refreshEvery\"' does not exist" in errors["unknown"][0]
    assert len(errors["missing"]) == 1 and "Property 'w' is missing" in errors["missing"][0]
