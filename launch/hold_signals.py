"""Run a command with stop signals blocked: `python launch/hold_signals.py USR1,TERM COMMAND [ARGS ...]`.

A blocked signal is neither lost nor fatal: it stays pending, across exec and in every process the command
forks, until that process unblocks it. `megacpt train` unblocks USR1 and TERM once its stop handler is
installed, so a stop sent while a rank is still starting (importing torch, loading a checkpoint) is honoured
at its first step; the deepspeed launcher's own processes never unblock them and so are not stopped by them.
"""
import os
import signal
import sys

names, *command = sys.argv[1:]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.Signals["SIG" + name] for name in names.split(",")})
os.execvp(command[0], command)
