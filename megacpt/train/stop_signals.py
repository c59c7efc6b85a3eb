"""SIGTERM and SIGUSR1: finish the current step, save and exit (the step guard makes every rank agree).

The launch scripts start the ranks with both signals blocked, so that one sent while Python starts is kept
pending rather than lost or fatal; installing the handler unblocks them and delivers it. Interrupted system
calls restart: the handler only sets a flag, and a save must not fail because a signal arrived during it.
"""
from __future__ import annotations

import signal


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can finish the step, save and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for sig in self.SIGNALS:  # once is enough; and a repeat must not kill the exiting interpreter, which
            signal.signal(sig, signal.SIG_IGN)  # puts back the default action (death) of Python handlers

    def requested(self) -> bool:
        return self.received is not None
