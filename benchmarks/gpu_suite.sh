#!/usr/bin/env bash
# Every GPU figure of the speed work in one go, on one machine, from one run:
#
#     bash benchmarks/gpu_suite.sh [OUT]        # default OUT: results/gpu_suite (relative to the repository)
#
# Random weights, 512 px, bf16, each loop against diffusers' per-step reference (samples/s, peak memory, both ratios,
# FLOPs per sample, TFLOP/s and model FLOP utilisation), in parts, the most wanted first:
#
#   1. sd14-unet         SD v1.4's U-Net against train_dreambooth.py
#   2. sana-0.6b         Sana 0.6B: the full transformer and LoRA against train_dreambooth_lora_sana.py's step
#   3. sd35-medium-lora  SD 3.5 medium LoRA against train_dreambooth_lora_sd3.py
#   4. sd35-medium-full  SD 3.5 medium's full transformer against train_dreambooth_sd3.py (2.24 B trained parameters:
#                        fp32 weights, gradients and AdamW's two moments 36 GB, the frozen T5-XXL/CLIPs/VAE in bf16
#                        11 GB, activations at batch 8 ~17 GB, autocast's bf16 weight copies ~5 GB: ~70 GB estimated,
#                        not measured; it fits an H200's 139 GiB, not a 40 GB card)
#   5. sd14-rest         SD v1.4: the memory profile of both U-Net loops (MemTracker categories, torch.cuda.memory
#                        snapshots), the U-Net ladder (channels_last, batch 16/32, gradient checkpointing, adamw8bit
#                        when bitsandbytes is installed, torch.compile last), the other strategies, DDP scaling when
#                        more than one GPU is visible
#
# Budget: 570 s in all (the device lends 15 minutes including its start); each part gets what is left, and a part
# that would start with under 45 s left is skipped and named. Every part writes its rows after each one
# (OUT/parts/<part>.json, .md), and OUT/gpu_suite.json and OUT/gpu_suite.md (the tables of docs/speed.md) are
# rebuilt from the parts after each part, so a run stopped by the limit keeps every row it finished. Also
# OUT/memory/*.pickle (open at https://pytorch.org/memory_viz) and OUT/log.txt.
#
# GPU_SUITE_CPU_CHECK=1 runs the same parts on the CPU at the tiny sizes of each family (sd14 -> tiny, sana-0.6b ->
# sana-tiny, sd35-medium -> sd3-tiny), one step each, in process: a check of this script's logic (parts, budget,
# merge), not a measurement. GPU_SUITE_BUDGET=SECONDS changes the budget (default 570).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu_suite}
BUDGET=${GPU_SUITE_BUDGET:-570}
CPU_CHECK=${GPU_SUITE_CPU_CHECK:-0}
if [ "$CPU_CHECK" = 1 ]; then
    RUN=(--device cpu --warmup 0 --steps 1 --in_process --no_compile)
else
    RUN=(--device cuda --warmup 3 --steps 10)
fi
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
command -v python > /dev/null || { echo "gpu_suite.sh: error: no python on PATH; activate the project's environment" >&2; exit 1; }
python - "$CPU_CHECK" <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "diffusers", "transformers", "lightning", "peft", "datasets") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_suite.sh: error: {', '.join(missing)} not importable by {sys.executable}; install the project first "
             "(pip install -e '.[dev]', see docs/install.md) or activate its environment")
import torch
if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit("gpu_suite.sh: error: no CUDA GPU visible (this suite measures GPUs; on CPU run "
             "benchmarks/train_throughput.py --size tiny / sana-tiny / sd3-tiny, or benchmarks/memory_estimate.py for "
             "SD-size memory)")
PY
mkdir -p "$OUT/parts"
if [ "$CPU_CHECK" = 1 ]; then
    echo "gpu_suite.sh: GPU_SUITE_CPU_CHECK=1: the parts at their tiny sizes on the CPU (a logic check, not a GPU figure)" | tee "$OUT/log.txt"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/log.txt"
fi
start=$(date +%s)
deadline=$(( start + BUDGET ))
DONE=()

merge() {  # OUT/gpu_suite.json and .md from the parts written so far, in the suite's order
    python - "$OUT" "${DONE[@]}" <<'PY'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
parts, tables = [], []
for name in names:
    js, md = out / "parts" / f"{name}.json", out / "parts" / f"{name}.md"
    if js.is_file():
        try:
            parts.append({"part": name, **json.loads(js.read_text())})
        except ValueError:
            parts.append({"part": name, "error": f"{js} is not readable JSON"})
    if md.is_file():
        tables.append(f"#### {name}\n\n{md.read_text()}")
notes = [line for line in (out / "skipped.txt").read_text().splitlines()] if (out / "skipped.txt").is_file() else []
(out / "gpu_suite.json").write_text(json.dumps({"parts": parts, "skipped": notes}, indent=1))
(out / "gpu_suite.md").write_text("\n".join(tables + [f"* {n}" for n in notes]) + "\n")
PY
}

tiny_size() {  # the CPU size of a GPU size's family (GPU_SUITE_CPU_CHECK)
    case $1 in sd14) echo tiny ;; sana-0.6b) echo sana-tiny ;; sd35-medium) echo sd3-tiny ;; *) echo "$1" ;; esac
}

part() {  # part NAME ARGS...: one run of train_throughput.py within what is left of the budget
    local name=$1 left status=0 arg previous="" args=()
    shift
    for arg in "$@"; do
        if [ "$CPU_CHECK" = 1 ] && [ "$previous" = --size ]; then arg=$(tiny_size "$arg"); fi
        args+=("$arg")
        previous=$arg
    done
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 45 ]; then
        echo "$name: not run (the ${BUDGET} s budget was spent by the parts before it)" | tee -a "$OUT/skipped.txt" "$OUT/log.txt"
        merge
        return 0
    fi
    echo "gpu_suite.sh: part $name (${left} s left)" | tee -a "$OUT/log.txt"
    DONE+=("$name")
    # timeout signals its whole process group, workers included; the part's rows are on disk after each row
    timeout "$left" python benchmarks/train_throughput.py "${RUN[@]}" --work "$OUT/work" \
        --json "$OUT/parts/$name.json" --markdown "$OUT/parts/$name.md" "${args[@]}" 2>&1 | tee -a "$OUT/log.txt" || status=$?
    merge
    if [ "$status" -eq 124 ]; then
        echo "$name: stopped at the ${BUDGET} s limit; its finished rows are in $OUT/gpu_suite.md" | tee -a "$OUT/skipped.txt" "$OUT/log.txt"
    elif [ "$status" -ne 0 ]; then
        echo "$name: failed (exit $status); see $OUT/log.txt" | tee -a "$OUT/skipped.txt" "$OUT/log.txt"
    fi
}

rm -f "$OUT/skipped.txt"
# SD v1.4 is written once as a diffusers folder that its workers load (drawn on the GPU); the DiT presets are drawn on
# the GPU in each worker (seconds), which is faster than writing and reading their 14-33 GB fp32 folders.
part sd14-unet --size sd14 --strategies unet --save_model "$OUT/sd14-random"
part sana-0.6b --size sana-0.6b --strategies unet lora
part sd35-medium-lora --size sd35-medium --strategies lora
part sd35-medium-full --size sd35-medium --strategies unet
part sd14-rest --size sd14 --suite --no_baseline --strategies unet_text_encoder lora textual_inversion projection projection_token \
    --save_model "$OUT/sd14-random" --memory_profile "$OUT/memory"
echo "gpu_suite.sh: done in $(( $(date +%s) - start )) s; tables: $OUT/gpu_suite.md" | tee -a "$OUT/log.txt"
