"""The daemon loop's sleep: signal handlers that only record the signal, and one select() that a
signal, a worker's pipe or file descriptor, or the timeout ends (supervisord's runforever)."""
from __future__ import annotations

import os
import select
import signal
from typing import Any, Callable


class Wakeup:
    def __init__(self) -> None:
        self.signals: list[int] = []     # received, not yet handled by the loop
        self._r, self._w = -1, -1

    def install(self, on_signal: Callable[[int, Any], None]) -> None:
        """SIGTERM/SIGINT go to on_signal (which should only record them); every signal,
        SIGCHLD included, also writes to a pipe the loop's select() watches."""
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        signal.set_wakeup_fd(self._w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop's select()

    def wait(self, fds: list[int], timeout_s: float) -> None:
        try:
            select.select([self._r, *fds], [], [], timeout_s)
        except InterruptedError:
            pass
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
