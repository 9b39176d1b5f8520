#!/usr/bin/env bash
# Copies the CRD (crds/rlhfjobs.yaml; scripts/gen_contract.py writes both after a contract change) into the Helm chart, which
# installs it from its crds/ folder. tests/unit/test_chart.py fails when the two differ.
# Usage: scripts/sync_crd.sh          copy
#        scripts/sync_crd.sh --check  exit 1 if the chart's copy is stale (copies nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=crds/rlhfjobs.yaml
DST=charts/rlhf-operator/crds/rlhfjobs.yaml
if [ "${1:-}" = "--check" ]; then
  if cmp -s "$SRC" "$DST"; then echo "chart CRD up to date"; exit 0; fi
  echo "chart CRD differs from $SRC: run scripts/sync_crd.sh" >&2
  exit 1
fi
mkdir -p "$(dirname "$DST")"
cp "$SRC" "$DST"
echo "copied $SRC -> $DST"
