#!/usr/bin/env bash
# The local S3-compatible server of the tests (moto's `moto_server`, moto[server]) in a virtual environment
# of its own, created once in a cache folder keyed by the moto version and the hash of its pins, then reused.
# moto stays out of the project's .venv: it needs boto3/botocore, whose python-dateutil<3 pin conflicts with
# the kubernetes client's python-dateutil>=3 (constraints.txt). The tests start it as a subprocess
# (tests/s3server.py); the initializer itself talks S3 through minio.
# Usage: scripts/install_moto.sh          -> creates the environment if missing; prints the moto_server path
#        scripts/install_moto.sh --check  -> prints the path if the environment exists, else exits 1
# MOTO_CACHE overrides the cache root.
set -euo pipefail
cd "$(dirname "$0")"
MOTO_VERSION=5.2.5
PINS=moto-constraints.txt   # moto's dependencies, as resolved with it (pip freeze of the environment)
KEY=$(sha256sum "$PINS" install_moto.sh | sha256sum | cut -c1-12)
ROOT=${MOTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-operator/moto}
VENV="$ROOT/$MOTO_VERSION-$KEY"
if [ -f "$VENV/.complete" ]; then
  echo "$VENV/bin/moto_server"; exit 0
fi
if [ "${1:-}" = --check ]; then
  echo "no moto server environment at $VENV" >&2; exit 1
fi
# A venv's scripts name their own folder, so it is built in place; .complete is written last (an install
# cut short is removed and done again).
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q -c "$PINS" "moto[server]==$MOTO_VERSION" >&2
touch "$VENV/.complete"
echo "$VENV/bin/moto_server"
