#!/usr/bin/env bash
# megacpt on this machine with NPROCS processes: one per GPU, or CPU processes (gloo) where there is none.
#
#   launch/local.sh NPROCS CONFIG [--set key=value ...]
#
# MASTER_PORT (default 29500) must be free. `kill -USR1 -- -PID` (PID of this script, which becomes the
# deepspeed launcher) makes every rank finish its step, checkpoint and exit 0; running the same command
# again resumes.
set -euo pipefail
usage="usage: launch/local.sh NPROCS CONFIG [--set key=value ...]"
nprocs="${1:-}"
if [[ ! "$nprocs" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: error: NPROCS must be a positive integer, got '$nprocs'; $usage" >&2
  exit 2
fi
if (( $# < 2 )); then
  echo "launch/local.sh: error: no CONFIG given; $usage" >&2
  exit 2
fi
shift
exec "$(dirname "$0")/deepspeed.sh" --num_gpus "$nprocs" --master_port "${MASTER_PORT:-29500}" \
  --module megacpt train "$@"
