"""SIGTERM and SIGUSR1: finish the current step, save and exit (the step guard makes every rank agree).

The launch scripts start the ranks with both signals blocked, so that one sent while Python starts is kept
pending rather than lost or fatal; installing the handler unblocks them and delivers it. Interrupted system
calls restart: the handler only sets a flag, and a save must not fail because a signal arrived during it.
A stop before the first step ends the run with STOPPED_BEFORE_TRAINING instead of 0.
"""
from __future__ import annotations

import atexit
import signal

# The exit status of a run stopped before its first step: sysexits' EX_TEMPFAIL, "try again later". Not 0,
# which a scheduler or a script reads as a finished run; launch/slurm_common.sh exits with it too.
STOPPED_BEFORE_TRAINING = 75


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can finish the step, save and exit cleanly.

    The handler stays for repeats (both signals often come together: SLURM's TERM and the USR1 that
    launch/deepspeed.sh passes on); replacing it with SIG_IGN while the other signal is pending makes Python
    raise "Signal N ignored due to race condition" in whatever runs. Only at exit are both ignored: the
    interpreter puts back the default action (death) of Python handlers as it finalizes, and a late repeat
    must not kill it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)
        atexit.register(self._ignore)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def _ignore(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def requested(self) -> bool:
        return self.received is not None
