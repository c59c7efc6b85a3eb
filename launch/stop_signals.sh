# Sourced by launch/deepspeed.sh and launch/slurm_common.sh (not run on its own): pass a stop requested of
# this shell on to what it started, from the moment it arrives until that has exited.
#
# With the trap below, USR1 and TERM do not kill this shell; they are remembered. wait_forwarding then sends
# the stop signal it is given to TARGET once a second until PID exits, so that processes which start after
# the request (ranks the launcher forks later, a job step still being created) get it too. The ranks'
# handler only sets a flag, so the repeats are harmless. INT is passed on once, unchanged (an abort).

stop_requested="${stop_requested:-0}"  # the batch scripts set the trap on their first line already
trap 'stop_requested=1' USR1 TERM
# A pipe nobody writes to: `read -t 1` from it waits a second without a child process (SLURM signals every
# process of a job step, and a `sleep` would die of USR1).
exec {stop_signals_tick}<> <(:)

# wait_forwarding PID TARGET SIGNAL [AFTER]: wait for PID (a child of this shell); once a stop is requested,
# send SIGNAL to TARGET (a pid, or -PGID for a process group) once a second, starting no earlier than AFTER
# seconds (default 0) after PID started. Returns PID's exit status.
wait_forwarding() {
  local pid="$1" target="$2" sig="$3" after="${4:-0}" started="$SECONDS" status
  trap 'kill -s INT -- "'"$target"'" 2>/dev/null || true' INT
  while :; do
    if (( stop_requested )) && kill -0 "$pid" 2>/dev/null; then
      if (( SECONDS - started >= after )); then
        kill -s "$sig" -- "$target" 2>/dev/null || true
      fi
      read -r -t 1 -u "$stop_signals_tick" || true
      continue
    fi
    status=0
    wait "$pid" || status=$?  # returns when PID exits, or with 128+N when a trapped signal N arrives
    if (( status <= 128 )) || ! kill -0 "$pid" 2>/dev/null; then
      return "$status"
    fi
  done
}
