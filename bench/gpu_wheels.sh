#!/usr/bin/env bash
# Run HERE (a machine with PyPI and this repo's .venv) before the GPU checks: the wheels that
# bench/gpu_checks.sh installs on a GPU machine that reaches no package index. That machine's image has
# torch, transformers, accelerate, peft, tokenizers, safetensors, pyarrow, pandas, prometheus-client and
# pyyaml; what the trainer and TRL need beyond them travels in .whl/ (git-ignored, ~15 MB).
#   bash bench/gpu_wheels.sh            -> .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
rm -rf .whl && mkdir -p .whl
# The versions of this repo's .venv (constraints.txt pins the project's own dependencies).
pin() { python -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"; }
PACKAGES=(trl datasets dill multiprocess hjson annotated-types typing-inspection math-verify latex2sympy2_extended
          antlr4-python3-runtime tensorboardX pydantic pydantic_core)
# For that machine's Python 3.12 on x86-64, whatever this one runs (multiprocess has a wheel per Python).
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $(for p in "${PACKAGES[@]}"; do pin "$p"; done)
# DeepSpeed ships only a source archive: build its pure-Python wheel (ops JIT-compiled where used).
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
du -sh .whl && ls .whl
