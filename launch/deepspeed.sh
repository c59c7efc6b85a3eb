#!/usr/bin/env bash
# The deepspeed launcher for this node, with SIGUSR1 left to the training ranks.
#
#   launch/deepspeed.sh [deepspeed launcher arguments] --module megacpt train CONFIG [--set key=value ...]
#
# A stop signal (SLURM's --signal=USR1, or `kill -USR1 -- -PGID` by hand) reaches every process of the job
# step or group. USR1's default action would kill deepspeed's runner and launch.py, and with them the job,
# while the ranks are still saving. An ignored signal stays ignored across exec, so both launcher processes
# ignore it; `megacpt train` installs its own handler in each rank (replacing the inherited "ignore"),
# finishes the step, checkpoints and exits 0, and the launchers then exit 0 too.
# Under srun, SLURM_NODEID becomes --node_rank (deepspeed uses it only with --no_ssh).
set -euo pipefail
trap '' USR1
exec "${DEEPSPEED:-deepspeed}" ${SLURM_NODEID:+"--node_rank=$SLURM_NODEID"} "$@"
