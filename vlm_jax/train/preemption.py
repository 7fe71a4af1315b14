"""Stopping on SIGTERM or Ctrl-C: every process saves the same step, then exits 0.

A signal only sets a flag. At each step boundary the processes agree on the flags (`distributed.gather_ints`:
one all-gather of an int32 per process, nothing at all for a single process), so a signal that reached any one
process stops all of them after the same step and each takes part in the same collective save; a process
deciding alone would leave the others waiting in that save. A second Ctrl-C aborts at once
(KeyboardInterrupt, no save).
"""
from __future__ import annotations

import os
import signal

from vlm_jax import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Installs the handlers for its `with` block; `agreed()` is the collective decision."""

    def __init__(self):
        self.received = 0  # the first signal this process received (0: none)
        self.interrupted = False  # a Ctrl-C came

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C
            self.interrupted = True
            os.write(2, b"Ctrl-C: saving a checkpoint after this step, then stopping; Ctrl-C again aborts "
                        b"without saving\n")
        self.received = self.received or signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self) -> str:
        """'' to go on, else why every process stops after this step (the same answer on all of them)."""
        received = distributed.gather_ints(int(self.received))
        senders = [p for p, s in enumerate(received) if s]
        if not senders:
            return ""
        name = signal.Signals(int(received[senders[0]])).name
        if len(received) == 1:
            return name
        return f"{name} (received by process {', '.join(map(str, senders))})"
