#!/usr/bin/env bash
# GPU benchmark: ViT and ImageGPT training steps in bf16 with torch.compile and flash attention, MFU against the
# GPU's bf16 peak (benchmarks/gpu.py). Needs a CUDA GPU; `benchmarks/gpu.sh --smoke` checks it runs on CPU.
#   benchmarks/gpu.sh                      # both models, 20 timed steps, writes benchmarks/gpu_results.json
#   benchmarks/gpu.sh --models vit --steps 50 --out /tmp/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
if [ -x "$(command -v nvidia-smi)" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$PYTHON" -m benchmarks.gpu "$@"
