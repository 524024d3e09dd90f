"""Ctrl-C while training: finish the iteration, save a checkpoint at its boundary, then stop."""

from __future__ import annotations

import signal
import sys
import threading


class DeferredInterrupt:
    """While training, the first Ctrl-C (SIGINT) only sets a flag: the iteration in progress finishes, a
    checkpoint is saved at that boundary and KeyboardInterrupt is raised. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._installed, self._previous = False, None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nngrpo: interrupt received; finishing this iteration and saving a checkpoint "
              "(press Ctrl-C again to stop at once and lose the iteration in progress)", file=sys.stderr, flush=True)

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
        return False
