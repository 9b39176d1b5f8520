#!/usr/bin/env bash
# The project's test command: linters, import contracts, unit + integration tests, then e2e.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
lint-imports
# The test control plane (kube-apiserver, controller-manager, scheduler, etcd) from the Go modules in
# e2e/controlplane: built here, outside pytest's per-test timeout, when its cache misses (tens of
# minutes cold on 2 cores; seconds warm). The cluster fixtures reuse the same cache.
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
echo "control plane binaries: $(bash e2e/controlplane/build.sh)"
# Two workers: most trainer tests are one single-threaded process (OMP_NUM_THREADS=1), so a second one
# uses CI's second core; the tests of the control plane all go to one worker (conftest.py).
python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadgroup tests e2e "$@"
