#!/usr/bin/env bash
# The project's test command: linters, import contracts, unit + integration tests, then e2e.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
lint-imports
python -m pytest -q -p no:cacheprovider tests e2e "$@"
