#!/usr/bin/env bash
# Shared body of the stage scripts: one task per node, each starting torchrun with a c10d
# rendezvous on the first node of the allocation. Usage (inside an allocation):
#   CONFIG=examples/configs/stage5_long_sft.yaml bash examples/slurm/launch_stage.sh [key=value ...]
# DRY_RUN=1 prints the resolved layout and command on every node without training.
set -euo pipefail

: "${CONFIG:?set CONFIG to a stage YAML}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"

# NCCL: InfiniBand for the ring hops across nodes, NVLink inside a node (Ulysses all-to-all).
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

launcher=(python -m megatron_longvila.training.launcher --config "$CONFIG"
          --nproc-per-node "$GPUS_PER_NODE")
if [ "${DRY_RUN:-0}" = "1" ]; then
    launcher+=(--dry-run)
fi
srun --kill-on-bad-exit=1 --ntasks-per-node=1 "${launcher[@]}" "$@"
