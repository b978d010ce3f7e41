"""Who may start a snapshot now: the loop's own schedule, or a FORCE_SNAPSHOT request.

Shared by the worker's main loop (``begin``/``end``) and its command thread
(``request``), so everything here holds a lock; the clock is injected for
tests.  The refusals are upstream powa-collector's, word for word, since
powa-web shows them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: FORCE_SNAPSHOT is refused when the last snapshot started less than this ago (upstream)
FORCE_MIN_INTERVAL = 10.0


@dataclass(frozen=True)
class GateView:
    in_progress: bool
    force_pending: bool
    #: monotonic start of the last snapshot, None before the first
    last_start: float | None


class ForceGate:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = FORCE_MIN_INTERVAL) -> None:
        self.clock = clock
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._in_progress = False
        self._pending = False
        self._last_start: float | None = None
        self._started = threading.Event()

    def request(self) -> str | None:
        """Queue a forced snapshot; the reason it is refused, or None when queued."""
        with self._lock:
            if self._in_progress:
                return "A snapshot is already in progress"
            if self._pending:
                return "A forced snapshot is already scheduled"
            last = self._last_start
            if last is not None and self.clock() - last < self.min_interval:
                return "Last snapshot was less than 10s. ago"
            self._pending = True
            self._started.clear()
        return None

    def wait_started(self, timeout: float) -> bool:
        """Did the queued snapshot begin within ``timeout`` seconds?"""
        return self._started.wait(timeout)

    @property
    def pending(self) -> bool:
        with self._lock:
            return self._pending

    def begin(self) -> float:
        """A snapshot starts now (forced or not); its monotonic start time."""
        now = self.clock()
        with self._lock:
            self._in_progress, self._pending, self._last_start = True, False, now
        self._started.set()
        return now

    def end(self) -> None:
        with self._lock:
            self._in_progress = False

    def view(self) -> GateView:
        with self._lock:
            return GateView(self._in_progress, self._pending, self._last_start)
