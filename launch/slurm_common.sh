# Sourced by the sbatch scripts in launch/ (not run on its own): the allocation's hosts, the master address
# and port, the hostfile, the preflight, and the launch itself (only printed with MEGACPT_DRY_RUN=1).
#
# sbatch runs a copy of the batch script from its spool folder, so this folder is found from the submit
# directory: submit from the repository root, or set MEGACPT_LAUNCH_DIR to this folder.
#
# Environment it reads (all optional except what sbatch sets):
#   GPUS_PER_NODE   ranks per node; default SLURM_GPUS_ON_NODE (set when the job asks for --gpus-per-node)
#   MASTER_ADDR     default: the first host of the allocation
#   MASTER_PORT     default: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node do not collide
#   HOSTFILE        default: ./hostfile-SLURM_JOB_ID (must be on a shared filesystem with NO_SSH=1)
#   GPU_MEMORY_GB   GPU memory the preflight plans for; default 80
#   PYTHON          the Python that has megacpt installed; default python
#   MEGACPT_DRY_RUN 1: check everything and print the launch command instead of running it

set -euo pipefail

die() {
  echo "megacpt launch: error: $*" >&2
  exit 2
}

[[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] \
  || die "SLURM_JOB_ID and SLURM_JOB_NODELIST are not set; submit this script with sbatch"
(( $# >= 1 )) || die "no CONFIG given; usage: sbatch launch/SCRIPT.sbatch CONFIG [--set key=value ...]"

LAUNCH_DIR="${MEGACPT_LAUNCH_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/launch}"
PYTHON="${PYTHON:-python}"
hostnames="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
mapfile -t HOSTS <<< "$hostnames"
NNODES="${#HOSTS[@]}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] \
  || die "GPUS_PER_NODE is '$GPUS_PER_NODE'; set it (or ask sbatch for --gpus-per-node) to the ranks each node runs"
export MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
HOSTFILE="${HOSTFILE:-$PWD/hostfile-$SLURM_JOB_ID}"

echo "megacpt launch: job $SLURM_JOB_ID on $NNODES node(s) x $GPUS_PER_NODE GPUs (${HOSTS[*]}), master $MASTER_ADDR:$MASTER_PORT"

# One "HOST slots=GPUS_PER_NODE" line per node of the allocation, in SLURM's order (node rank order).
write_hostfile() {
  local host
  for host in "${HOSTS[@]}"; do
    echo "$host slots=$GPUS_PER_NODE"
  done > "$HOSTFILE"
}

# `megacpt plan` on the config and this cluster: exits 2 (and so stops the job) on a bad hostfile, a world
# size the tensor-parallel degree does not divide, or a model that fits on no layout; prints the plan.
preflight() {
  "$PYTHON" -m megacpt plan "$@" --gpu-memory-gb "${GPU_MEMORY_GB:-80}"
}

launch() {
  if [[ "${MEGACPT_DRY_RUN:-0}" == 1 ]]; then
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
