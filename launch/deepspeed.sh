#!/usr/bin/env bash
# The deepspeed launcher for this node, with the stop signals (USR1, TERM) left to the training ranks.
#
#   launch/deepspeed.sh [deepspeed launcher arguments] --module megacpt train CONFIG [--set key=value ...]
#
# A stop signal must reach the ranks, and only them: the deepspeed launcher's processes (its runner and
# launch.py) would die of USR1 and take the job down mid-save, and on TERM they kill the ranks after 30 s.
# So the launcher runs with USR1 and TERM blocked (launch/hold_signals.py), in a process group of its own;
# the ranks inherit the block and `megacpt train` lifts it once its handler is installed, so a signal sent
# while a rank starts is kept pending, not lost. This script stays in front: after a USR1 or TERM of its own
# (`kill PID`, SLURM signalling the job step) it sends USR1 to the launcher's whole group once a second until
# the launcher exits, which reaches ranks forked after the signal too. The ranks finish their step, save and
# exit 0, and so does everything above them. INT (Ctrl-C) is passed on once: DeepSpeed's abort.
#
# With a multi-node hostfile and no --no_ssh, the runner starts every rank over ssh (pdsh), out of reach of
# this node's signals; there DeepSpeed's own TERM handling stops them (pkill over pdsh: TERM to each node's
# launch.py, which gives its ranks 30 s), and USR1 is turned into that TERM.
# Under srun, SLURM_NODEID becomes --node_rank (deepspeed uses it only with --no_ssh).
set -euo pipefail
launch_dir="$(dirname "$0")"
source "$launch_dir/stop_signals.sh"
command=("${DEEPSPEED:-deepspeed}" ${SLURM_NODEID:+"--node_rank=$SLURM_NODEID"} "$@")
hold=("${PYTHON:-python}" "$launch_dir/hold_signals.py")

over_ssh=0
for arg in "$@"; do
  case "$arg" in
    --hostfile|--hostfile=*) over_ssh=1 ;;
    --no_ssh) over_ssh=0; break ;;
    --module|--no_python) break ;;  # the training command starts here
  esac
done

if (( over_ssh )); then
  "${hold[@]}" USR1 "${command[@]}" {stop_signals_tick}<&- &
  wait_forwarding $! $! TERM
else
  # Blocked before setsid: the new group can be signalled from the moment it exists.
  "${hold[@]}" USR1,TERM setsid "${command[@]}" {stop_signals_tick}<&- &
  wait_forwarding $! -$! USR1
fi
