#!/usr/bin/env bash
# The GPU half of the "GPU scale" checks, as ONE prepared run for a lent GPU machine (bare, no package
# index, `python3` holds torch). Prepare here first: `bash bench/gpu_wheels.sh`, then run it there with
# `.whl` carried:  bash bench/gpu_checks.sh   (about 8 minutes on one H200; logs and JSON under $OUT).
#  1. a Qwen2.5-0.5B-shaped model (random weights) in bf16: our DPO and GRPO step against TRL's, tokens/s
#     and MFU (goal: DPO training at 40% MFU or more; --peak-tflops is the GPU's dense bf16 peak);
#  2. two ranks per pod on NCCL: tiny DPO with the actor's pods of two GPUs (two ranks) each, through
#     run-local (needs one GPU per rank: not run, and said so, on a machine with fewer than 2 GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/trainer_image:$PWD/contract:$PWD/operator" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, deepspeed, trl; print(torch.__version__, transformers.__version__, deepspeed.__version__, trl.__version__)" | tee -a "$OUT/gpus.txt"
PEAK=${PEAK_TFLOPS:-989}   # H100 / H200 SXM dense bf16
# 1. 32 pairs / prompts per step, ~460-token rows: big enough to fill the GPU's matrix units.
timeout 420 python3 bench/trainer_vs_trl.py --device cuda --model qwen2.5-0.5b --precision bf16 --prompts 32 \
  --context-tokens 448 --repeats 2 --steps 5 --warmup 2 --only dpo --only grpo --peak-tflops "$PEAK" --no-write \
  2>&1 | tee "$OUT/mfu.log"
# 2. two ranks per pod on NCCL: dpo-tiny with the actor's pods of 2 GPUs each (two pods when the machine has
#    4 GPUs), the reference in the actor's processes; run-local hands each pod its own GPUs.
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
  PODS=$(( GPUS >= 4 ? 2 : 1 ))
  python3 - "$PODS" "$OUT/dpo-nccl.yaml" <<'PY'
import sys, yaml
obj = yaml.safe_load(open("crds/examples/dpo-tiny.yaml"))
for role in obj["spec"]["roles"]:
    if role["name"] == "actor":
        role.update(replicas=int(sys.argv[1]), gpus=2)
    else:
        role.clear(); role.update(name="reference", colocateWith="actor")
obj["spec"]["hyperparameters"].update(maxSteps=6, batchSize=8, microBatchSize=2)
obj["spec"]["checkpoint"].update(intervalSteps=2)
yaml.safe_dump(obj, open(sys.argv[2], "w"))
PY
  timeout 300 python3 -m rlhf_operator.cli run-local "$OUT/dpo-nccl.yaml" --workdir /tmp/gpu-runs --fresh --no-progress \
    2>&1 | tee "$OUT/ranks.log"
  grep -h '"step"' /tmp/gpu-runs/*/checkpoints/metrics/actor-*.jsonl | tail -4 >> "$OUT/ranks.log"
else
  echo "two ranks per pod on NCCL: not run, this machine has $GPUS GPU (NCCL wants one GPU per rank)" | tee "$OUT/ranks.log"
fi
