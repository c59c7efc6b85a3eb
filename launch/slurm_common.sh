# Sourced by the sbatch scripts in launch/ (not run on its own): the allocation's hosts, CPUs and ranks per
# node, the master address and port, the hostfile, the preflight, and the launch itself (only printed with
# MEGACPT_DRY_RUN=1), which this batch shell waits for while passing stop signals on to it.
#
# sbatch runs a copy of the batch script from its spool folder, so this folder is found from the submit
# directory: submit from the repository root, or set MEGACPT_LAUNCH_DIR to this folder.
#
# Environment it reads (all optional except what sbatch sets):
#   GPUS_PER_NODE   ranks per node (GPUs, or CPU processes); default SLURM_GPUS_ON_NODE (set when the job asks
#                   for --gpus-per-node), then what the sbatch script derives (the per-task one: tasks per node)
#   MASTER_ADDR     default: the first host of the allocation
#   MASTER_PORT     default: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node do not collide
#   HOSTFILE        default: TMPDIR/megacpt-hostfile-SLURM_JOB_ID, or ./.megacpt-hostfile-SLURM_JOB_ID (shared
#                   with the other nodes) when every node reads it (NO_SSH=1 on several nodes); removed at exit
#   GPU_MEMORY_GB   GPU memory the preflight plans for; default 80
#   PYTHON          the Python that has megacpt installed; default python
#   STOP_FORWARD_DELAY  seconds after the launch before a stop this shell received is passed on; default 3
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
source "$LAUNCH_DIR/stop_signals.sh"
PYTHON="${PYTHON:-python}"
hostnames="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
mapfile -t HOSTS <<< "$hostnames"
NNODES="${#HOSTS[@]}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${RANKS_PER_NODE_DEFAULT:-}}}"
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE is '$GPUS_PER_NODE'; set it (or ask sbatch for \
--gpus-per-node) to the ranks each node runs: its GPUs, or on a partition without GPUs the CPU processes"
CPUS_ON_NODE="${SLURM_CPUS_ON_NODE:-1}"  # what the job holds on a node (all of it: #SBATCH --exclusive)
export MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
if [[ -z "${HOSTFILE:-}" ]]; then
  if [[ "${NO_SSH:-0}" == 1 ]] && (( NNODES > 1 )); then
    HOSTFILE="$PWD/.megacpt-hostfile-$SLURM_JOB_ID"
  else
    HOSTFILE="${TMPDIR:-/tmp}/megacpt-hostfile-$SLURM_JOB_ID"
  fi
  trap 'rm -f "$HOSTFILE"' EXIT
fi

echo "megacpt launch: job $SLURM_JOB_ID on $NNODES node(s) x $GPUS_PER_NODE ranks, $CPUS_ON_NODE CPUs each node" \
  "(${HOSTS[*]}), master $MASTER_ADDR:$MASTER_PORT"

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

# The launch, in the background, so that this shell can wait for it and take a stop meanwhile: a USR1 or TERM
# of its own (`--signal=B:USR1@...`, `scancel --batch --signal=USR1`) becomes USR1 to srun, which forwards it
# to every process of the job step (launch/stop_signals.sh). Not TERM: srun takes it as an order to end the step.
# The TERM of scancel, a requeue or the time limit reaches the job step from SLURM itself. A stop that comes
# before srun has run for STOP_FORWARD_DELAY seconds (default 3) waits until then: srun would deliver it the
# moment the step's tasks start, before their shells have set the traps that make them survive it.
launch() {
  if [[ "${MEGACPT_DRY_RUN:-0}" == 1 ]]; then
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@" {stop_signals_tick}<&- &
    wait_forwarding $! $! USR1 "${STOP_FORWARD_DELAY:-3}"
  fi
}
