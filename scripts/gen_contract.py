#!/usr/bin/env python3
"""Regenerate what the contract (contract/rlhf_contract) defines into the files that show it:
the CRD's schema blocks (crds/rlhfjobs.yaml and the chart's copy) and docs/spec.md's tables.

Usage: python scripts/gen_contract.py          rewrite the files
       python scripts/gen_contract.py --check  exit 1 naming each stale file (writes nothing)
tests/unit/test_contract.py runs the same check in CI. Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "contract"))

from rlhf_contract.generate import render_crd, render_doc  # noqa: E402

CRD = ROOT / "crds" / "rlhfjobs.yaml"
CHART_CRD = ROOT / "charts" / "rlhf-operator" / "crds" / "rlhfjobs.yaml"
SPEC_DOC = ROOT / "docs" / "spec.md"


def expected() -> dict[Path, str]:
    """Every generated file -> the text it must have."""
    crd = render_crd(CRD.read_text(), str(CRD.relative_to(ROOT)))
    return {CRD: crd, CHART_CRD: crd, SPEC_DOC: render_doc(SPEC_DOC.read_text(), str(SPEC_DOC.relative_to(ROOT)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = [path for path, text in expected().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/gen_contract.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected().items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
