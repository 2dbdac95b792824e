#!/usr/bin/env bash
# Multi-node kiln training under Slurm: one torchrun per node, c10d rendezvous on the first node.
#
#   sbatch --nodes 2 scripts/slurm_train.sh dense-180m --parallel.dp_shard 16
#
# The product pp x dp_replicate x dp_shard x tp must equal nodes x GPUS_PER_NODE; run.out_dir must be
# on storage every node sees (checkpoints are written by every rank, then renamed by rank 0).
#SBATCH --job-name=kiln
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --signal=TERM@120          # preemption: SIGTERM 2 minutes before the end; kiln saves and exits
#SBATCH --requeue                  # a requeued job resumes from its latest checkpoint

set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-29500}
KILN=${KILN:-$(dirname "$0")/../.venv/bin}

srun --kill-on-bad-exit=1 "$KILN/torchrun" \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
    -m kiln train "$@"
