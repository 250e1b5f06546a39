#!/usr/bin/env bash
# Multi-GPU (or multi-process CPU) training of one model with torch.distributed (DDP).
#   deploy/torchrun.sh MODEL [NPROC] [extra tessera train args]
# NCCL on GPUs, gloo on CPU; each rank reads its own shards (webdataset split_by_node); rank 0 logs and checkpoints.
set -euo pipefail
model=${1:?usage: deploy/torchrun.sh MODEL [NPROC] [args...]}
nproc=${2:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
shift $(( $# >= 2 ? 2 : 1 ))
exec torchrun --standalone --nproc_per_node "$nproc" -m flows.cli train "$model" "$@"
