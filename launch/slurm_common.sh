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
#   DEEPSPEED       the deepspeed launcher of that environment; default deepspeed
#   STOP_FORWARD_DELAY  seconds after the launch before a stop this shell received is passed on; default 3
#   MEGACPT_DRY_RUN 1: check everything and print the launch command instead of running it
#
# Exit status: the launch's, except that a job stopped before its first step (nothing trained) exits 75
# (STOPPED_BEFORE_TRAINING, as `megacpt train` does in that case): a stop that arrived before the launch, or
# ranks that SLURM's stop signal killed as they started, before they could take it.

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
STOPPED_BEFORE_TRAINING=75
BATCH_SHELL_PID=$$

# A job step from the job's first second to its end, so that a stop sent to the job's steps is never lost:
# SLURM delivers `scancel --signal=SIG JOB` and `--signal=SIG@...` (without --batch, --full or B:) to the job's
# steps only, and drops them while there is none (during the preflight, between two steps; scancel still
# exits 0). The watch step's one task, on this node, sleeps until the first USR1 or TERM kills it; its srun
# then exits 128 + that signal, and the subshell around it passes the stop on to this batch shell as USR1.
# It shares the job's CPUs with the launch (--overlap), and end_stop_watch ends it when this shell exits.
# Only under slurmd (SLURMD_NODENAME names this node) and not in a dry run.
STOP_WATCH_PID=""
start_stop_watch() {
  [[ -n "${SLURMD_NODENAME:-}" && "${MEGACPT_DRY_RUN:-0}" != 1 ]] || return 0
  local errors="${TMPDIR:-/tmp}/megacpt-stop-watch-$SLURM_JOB_ID.err"
  (
    trap 'kill -s TERM "$srun_pid" 2>/dev/null; rm -f "$errors"; exit 0' TERM  # end_stop_watch
    srun --overlap --nodes=1 --ntasks=1 --nodelist="$SLURMD_NODENAME" --cpus-per-task=1 \
      --job-name=megacpt-stop-watch sleep infinity 2>"$errors" &
    srun_pid=$!
    status=0
    wait "$srun_pid" || status=$?
    case "$status" in
      $((128 + $(kill -l USR1))) | $((128 + $(kill -l TERM)))) kill -s USR1 "$BATCH_SHELL_PID" 2>/dev/null ;;
      *) echo "megacpt launch: warning: the stop watch step ended with status $status ($(tr '\n' ' ' < "$errors")):" \
           "a stop sent to the job's steps before the launch step exists is lost; send it to the batch shell" \
           "(scancel --batch --signal=USR1 JOB)" >&2 ;;
    esac
    rm -f "$errors"
  ) {stop_signals_tick}<&- &
  STOP_WATCH_PID=$!
}
end_stop_watch() {
  [[ -z "$STOP_WATCH_PID" ]] || kill -s TERM "$STOP_WATCH_PID" 2>/dev/null || true
}
HOSTFILE_IS_OURS=0  # set below when this shell picks the hostfile's path, and so removes it at exit
trap 'end_stop_watch; (( ! HOSTFILE_IS_OURS )) || rm -f "$HOSTFILE"' EXIT
start_stop_watch

# -I: not the megacpt folder of the submit directory, which imports without its dependencies being installed.
"$PYTHON" -I -c 'import importlib.metadata as m; m.version("megacpt")' 2>/dev/null \
  || die "'$PYTHON' has no megacpt installed: activate the environment megacpt is installed in before sbatch (the \
job inherits it), or set PYTHON=/path/to/env/bin/python and DEEPSPEED=/path/to/env/bin/deepspeed"
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
  HOSTFILE_IS_OURS=1
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
# size the tensor-parallel degree does not divide, or a model that fits on no layout; prints the plan. Without
# GPUs (none asked of SLURM, no nvidia-smi) it plans CPU processes in this node's memory.
preflight() {
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]] || nvidia-smi -L >/dev/null 2>&1; then
    "$PYTHON" -m megacpt plan "$@" --gpu-memory-gb "${GPU_MEMORY_GB:-80}"
  else
    "$PYTHON" -m megacpt plan "$@" --cpu
  fi
}

# The job's end when it trained nothing: the message, and the exit status that says "run me again".
stopped_before_training() {
  echo "megacpt launch: stopped before the first step ($*): nothing trained; submit the job again (or requeue it) \
to train" >&2
  exit "$STOPPED_BEFORE_TRAINING"
}

# The launch, in the background, so that this shell can wait for it and take a stop meanwhile: a USR1 or TERM
# of its own (`--signal=B:USR1@...`, `scancel --batch --signal=USR1`) becomes USR1 to srun, which forwards it
# to every process of the job step (launch/stop_signals.sh). Not TERM: srun takes it as an order to end the step.
# The TERM of scancel, a requeue or the time limit reaches the job step from SLURM itself. A stop that comes
# before srun has run for STOP_FORWARD_DELAY seconds (default 3) waits until then: srun would deliver it the
# moment the step's tasks start, before their shells have set the traps that make them survive it. A stop
# that came before the launch ends the job without starting the ranks.
#
# SLURM itself signals every process of the job step the moment it exists (`scancel --signal=USR1 JOB`, a
# `--signal=USR1@...` due at startup): a task that has not yet blocked the signal dies of it, and srun exits
# 128 + the signal. No rank trains before it has blocked the stop signals, so that is a stop before the first
# step too, and reported as one.
launch() {
  local status=0
  if [[ "${MEGACPT_DRY_RUN:-0}" == 1 ]]; then
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
    return
  fi
  (( ! stop_requested )) || stopped_before_training "a stop signal reached the batch shell before the launch"
  "$@" {stop_signals_tick}<&- &
  wait_forwarding $! $! USR1 "${STOP_FORWARD_DELAY:-3}" || status=$?
  case "$status" in
    "$STOPPED_BEFORE_TRAINING") stopped_before_training "the ranks took a stop signal during their startup" ;;
    $((128 + $(kill -l USR1))) | $((128 + $(kill -l TERM))))
      stopped_before_training "SLURM's stop signal $(kill -l $((status - 128))) killed the job step's processes \
as they started, before they could hold it" ;;
  esac
  return "$status"
}
