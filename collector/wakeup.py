"""Signal flags and an interruptible wait, for the daemons' main loops.

Signal handlers only set flags.  The C-level signal machinery also writes a
byte to a self-pipe (``signal.set_wakeup_fd``), and helper threads write to
the same pipe, so that a main loop blocked in ``wait()`` wakes at once on a
signal or a command, whatever it was waiting for.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType


class Wakeup:
    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def notify(self) -> None:
        """Wake the main loop (callable from any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write, b"\0")

    def wait(self, timeout: float, fds: Iterable[int] = ()) -> list[int]:
        """Sleep until ``timeout``, a notify(), a signal, or one of ``fds`` is readable.

        Returns the readable ``fds`` (the pipe itself is drained, not returned).
        """
        watched = [self._read, *fds]
        try:
            ready, _, _ = select.select(watched, [], [], max(0.0, timeout))
        except (OSError, ValueError):
            # a watched socket was closed under us: let the caller look again
            return []
        if self._read in ready:
            self.drain()
        return [fd for fd in ready if fd != self._read]

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read, 512):
                pass

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


class SignalFlags:
    """Flags set by SIGTERM/SIGINT (stop; a second one: stop now) and SIGHUP (reload)."""

    def __init__(self, wakeup: Wakeup) -> None:
        self.wakeup = wakeup
        self.stop = False
        self.stop_now = False
        self.reload = False
        self.stop_requested_at: float | None = None
        #: called after each signal (from the signal handler: they must only set flags)
        self.listeners: list[Callable[[], None]] = []

    def install(self) -> None:
        signal.set_wakeup_fd(self.wakeup._write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler; also called directly by tests."""
        if signum == signal.SIGHUP:
            self.reload = True
        elif self.stop:
            self.stop_now = True
        else:
            self.stop = True
            self.stop_requested_at = time.monotonic()
        self.wakeup.notify()
        for listener in self.listeners:
            listener()
