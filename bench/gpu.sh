#!/usr/bin/env bash
# Prepared for a session that has a GPU; not run yet (no GPU was lent to the session that wrote it).
#
# About 5-8 minutes on one H100/H200: for a ~1B Llama-shaped model with random weights in bf16,
# the engine's decode tokens/s at batch 1 and 64, full and half depth, beside plain generate() with a
# static cache and the memory-bandwidth bound (copy bandwidth measured in the same run; goal >= 50%
# of the bound at batch 1, >= 60% at 64); then the engine's structural counts (FLOPs vs minimum, LM
# heads per row, host syncs per step, aten ops per layer, attention at 128 vs 2048) on CUDA.
# Appends a dated entry (device, command, figures) to bench/RESULTS.md and writes bench/out/gpu_decode.json.
# Needs torch with CUDA and transformers only (no server packages).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/operator:$PWD/worker:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python -m helios_bench.gpu_decode --json bench/out/gpu_decode.json --results-md bench/RESULTS.md
