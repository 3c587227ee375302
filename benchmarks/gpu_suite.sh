#!/usr/bin/env bash
# Every GPU figure of the speed work in one go, on one machine, from one run:
#
#     bash benchmarks/gpu_suite.sh [OUT]        # default OUT: results/gpu_suite (relative to the repository)
#
# At SD v1.4's size (random weights, 512 px, bf16): each strategy against diffusers' per-step reference (samples/s,
# peak memory, both ratios), the U-Net ladder (channels_last, batch 16/32, gradient checkpointing, adamw8bit when
# bitsandbytes is installed, torch.compile), FLOPs per sample with TFLOP/s and model FLOP utilisation, DDP scaling
# when more than one GPU is visible, and a memory profile of both U-Net loops (MemTracker categories and
# torch.cuda.memory snapshots). Writes OUT/gpu_suite.json, OUT/gpu_suite.md (the table of docs/speed.md), OUT/memory/*.pickle
# (open at https://pytorch.org/memory_viz) and OUT/log.txt. Budget: under 10 minutes on one H100/H200; it stops at
# 9.5 minutes whatever happens (the rows finished by then are in the log).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_suite}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
command -v python > /dev/null || { echo "gpu_suite.sh: error: no python on PATH; activate the project's environment" >&2; exit 1; }
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "diffusers", "transformers", "lightning", "peft", "datasets") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_suite.sh: error: {', '.join(missing)} not importable by {sys.executable}; install the project first "
             "(pip install -e '.[dev]', see docs/install.md) or activate its environment")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_suite.sh: error: no CUDA GPU visible (this suite measures GPUs; on CPU run "
             "benchmarks/train_throughput.py --size tiny, or benchmarks/memory_estimate.py for SD-size memory)")
PY
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
start=$(date +%s)
# The model is written once as a diffusers folder and every worker loads it with from_pretrained (drawing 1 B random
# weights in each of ~20 workers would take most of the budget).
# What matters most runs first (U-Net against its reference, the memory profile, the ladder with torch.compile last,
# then the other strategies); the JSON and markdown are rewritten after every row, so a run stopped by the time limit
# keeps what it measured. timeout signals its whole process group, workers included.
status=0
timeout 570 python benchmarks/train_throughput.py --size sd14 --device cuda --suite --warmup 3 --steps 10 \
    --save_model "$OUT/sd14-random" --work "$OUT/work" --memory_profile "$OUT/memory" \
    --json "$OUT/gpu_suite.json" --markdown "$OUT/gpu_suite.md" 2>&1 | tee -a "$OUT/log.txt" || status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_suite.sh: stopped at the 570 s limit; the rows measured by then are in $OUT/gpu_suite.md" | tee -a "$OUT/log.txt"
elif [ "$status" -ne 0 ]; then
    echo "gpu_suite.sh: error: the benchmark failed (exit $status); see $OUT/log.txt" | tee -a "$OUT/log.txt"
    exit "$status"
fi
echo "gpu_suite.sh: done in $(( $(date +%s) - start )) s; table: $OUT/gpu_suite.md" | tee -a "$OUT/log.txt"
