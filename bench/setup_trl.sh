#!/usr/bin/env bash
# The TRL side of bench/trainer_vs_trl.py (not needed by the tests or CI):
#   trl 1.16 (DPOTrainer, GRPOTrainer) into the project's .venv, under the project's constraints;
#   trl 1.12 (PPOTrainer, trl.experimental.ppo; later releases dropped it) into its own venv,
#   bench/out/trl112, with the same torch as .venv (the bench's --trl-ppo-python default).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/install.sh first" >&2; exit 1; }
.venv/bin/pip install -q -c .venv/torch-constraint.txt -c constraints.txt "trl==1.16.0"
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
[ -x bench/out/trl112/bin/python ] || python3 -m venv bench/out/trl112
bench/out/trl112/bin/pip install -q "torch==${torch_version}" "trl==1.12.*"
bench/out/trl112/bin/python -c 'import trl.experimental.ppo, trl; print("trl", trl.__version__, "in bench/out/trl112")'
