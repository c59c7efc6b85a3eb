#!/usr/bin/env bash
# One training rank per srun task: SLURM's task coordinates become the torch.distributed variables that
# `megacpt train` reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE; MASTER_ADDR and MASTER_PORT come
# from the batch script's environment).
#
#   srun launch/task.sh CONFIG [--set key=value ...]
#
# SLURM signals every task of the step directly. The rank starts with USR1 and TERM blocked
# (launch/hold_signals.py) and `megacpt train` unblocks them once its handler is installed, so a stop sent
# while it starts is honoured at its first step instead of killing it.
set -euo pipefail
: "${MASTER_ADDR:?MASTER_ADDR is not set (launch/slurm_srun_tasks.sbatch exports it)}"
: "${MASTER_PORT:?MASTER_PORT is not set (launch/slurm_srun_tasks.sbatch exports it)}"
export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-1}"
python="${PYTHON:-python}"
exec "$python" "$(dirname "$0")/hold_signals.py" USR1,TERM "$python" -m megacpt train "$@"
