"""The watchdog of a worker: deadlines of a snapshot, and the stop that cannot wait.

Runs in a thread of its own beside the worker's main thread (which takes the
snapshots) and acts on the snapshot through cancel requests and, when those
go unanswered, by shutting a connection's socket down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from collector import pg
from collector.wakeup import SignalFlags, Wakeup
from collector.worker.remote import RemoteSession
from collector.worker.snapshot import Guard

log = logging.getLogger("collector.worker")


class Watchdog(threading.Thread, Guard):
    """Cancels the queries of a snapshot that overruns its deadlines or must stop.

    The remote part of a snapshot must end within one period, so that a hung
    remote cannot stall the worker: past the deadline its statement is
    cancelled, and if that same statement still runs ``ABORT_AFTER`` seconds
    later (a frozen backend ignores cancels, and its kernel still answers TCP
    keepalives), the connection's socket is shut down under it.  The
    repository part gets a far longer deadline, handled the same way.  On
    stop, the snapshot gets ``grace`` seconds, then both sides are cancelled;
    on a second stop signal, at once.

    It sleeps on a pipe of its own until the nearest thing it may have to do:
    a deadline, the end of a stop's grace, a cancel's ``ABORT_AFTER``.  Whoever
    sets a deadline earlier than that wakes it through the pipe, and so do
    the signal handlers (they only write to it: no lock is taken in a handler).
    A deadline later than its planned wake-up needs no wake-up at all: with
    nothing to watch it still wakes every ``IDLE_WAKE`` seconds, so the
    repository's deadline (``REPOSITORY_BUDGET`` away at least) is learnt on
    the way, and a snapshot costs the thread one or two wake-ups, not one
    every fraction of a second.
    """

    ABORT_AFTER = 5.0
    IDLE_WAKE = 600.0
    #: it wakes this much before the next snapshot's earliest deadline (see disarm):
    #: that deadline is the start of the snapshot after it, when the main thread
    #: wakes too, and the two would contend for the GIL
    QUIET_MARGIN = 0.5
    #: the shortest sleep: a deadline found already past (set while the thread
    #: looked) is acted on that much later, and an action that keeps failing
    #: is not retried in a tight loop
    MIN_SLEEP = 0.05

    def __init__(
        self, flags: SignalFlags, grace: float, on_stop: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__(name="watchdog", daemon=True)
        self.flags = flags
        self.grace = grace
        self.on_stop = on_stop
        #: the running snapshot was cancelled because the worker stops
        self.cancelled_on_stop = False
        self._stop_seen = False
        self._lock = threading.Lock()
        self._wakeup = Wakeup()
        flags.listeners.append(self._wakeup.notify)
        self._remote: RemoteSession | None = None
        self._remote_deadline = 0.0
        self._remote_watched = False
        self._statements = 0
        #: when the remote was cancelled, and which statement ran then
        self._remote_cancel: tuple[float, int] | None = None
        self._repo: psycopg.Connection[Any] | None = None
        self._repo_deadline = 0.0
        self._repo_cancel: float | None = None
        self._closing = False
        #: when the thread wakes next by itself (0: it is about to look anyway)
        self._planned = 0.0
        #: the next snapshot's deadlines come no earlier than this (see disarm)
        self._quiet_until = 0.0

    # ---------------------------------------------------------------- the worker's side
    def arm(self, remote: RemoteSession, repo_deadline: float) -> None:
        """A snapshot starts; its repository part must end by ``repo_deadline``."""
        # nothing is watched yet: remote_begin() and watch_repository() wake the thread
        with self._lock:
            self._remote, self._remote_watched, self._remote_cancel = remote, False, None
            self._repo, self._repo_deadline, self._repo_cancel = None, repo_deadline, None
            self.cancelled_on_stop = False

    def watch_repository(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._repo = conn
            wake = self._sooner(self._repo_deadline)
        if wake:
            self._wakeup.notify()

    def disarm(self, quiet_until: float = 0.0) -> None:
        """The snapshot is over.  ``quiet_until``: no deadline of the next one comes
        earlier (monotonic); the thread plans to wake a little before, so that arming
        the next snapshot costs it no wake-up (an earlier deadline still wakes it)."""
        with self._lock:
            self._remote = self._repo = None
            self._remote_watched = False
            self._quiet_until = quiet_until

    def close(self) -> None:
        self._closing = True
        self._wakeup.notify()

    # ---------------------------------------------------------------- the snapshot's side
    def remote_begin(self, deadline: float) -> None:
        with self._lock:
            self._remote_deadline, self._remote_watched = deadline, True
            self._remote_cancel = None
            wake = self._sooner(deadline)
        if wake:
            self._wakeup.notify()

    def _sooner(self, deadline: float) -> bool:
        """Must the thread wake before it planned to (under the lock)?"""
        # during a stop the grace, not the deadline, may be what comes first
        return deadline < self._planned or self.flags.stop

    def remote_statement(self) -> None:
        with self._lock:
            self._statements += 1

    def remote_end(self) -> None:
        with self._lock:
            self._remote_watched = False

    def cancelled(self) -> bool:
        return self.cancelled_on_stop or self.flags.stop_now

    # ---------------------------------------------------------------- the thread
    def run(self) -> None:
        while not self._closing:
            try:
                self.check(time.monotonic())
            except Exception:
                # a dead watchdog would leave every later snapshot without deadlines
                log.exception("watchdog check failed; watching on")
            with self._lock:
                now = time.monotonic()
                # set with the state it is computed from: a later deadline sees it
                self._planned = self.next_check(now)
            self._wakeup.wait(max(self.MIN_SLEEP, self._planned - now))
        self._wakeup.close()

    def next_check(self, now: float) -> float:
        """When check() may next have something to do, as it stands (under the lock)."""
        flags = self.flags
        times = [now + self.IDLE_WAKE]
        if self._quiet_until - self.QUIET_MARGIN > now:
            times.append(self._quiet_until - self.QUIET_MARGIN)
        if flags.stop and not self._stop_seen:
            times.append(now)
        # the same conditions as the actions', so that a wake-up finds one due
        stop_at = float("inf")
        if flags.stop:
            stop_at = now if flags.stop_now else (flags.stop_requested_at or now) + self.grace
        if self._remote is not None and self._remote_watched:
            if self._remote_cancel is None:
                times.append(min(self._remote_deadline, stop_at))
            elif self._remote_cancel[1] == self._statements:
                times.append(self._remote_cancel[0] + self.ABORT_AFTER)
        if self._repo is not None:
            if self._repo_cancel is None:
                times.append(min(self._repo_deadline, stop_at))
            else:
                times.append(self._repo_cancel + self.ABORT_AFTER)
        return min(times)

    def check(self, now: float) -> None:
        """Act on the running snapshot, each action once."""
        flags = self.flags
        if flags.stop and not self._stop_seen:
            # the main thread may be busy in a snapshot: say "stopping" now
            self._stop_seen = True
            self.on_stop()
        stopping = flags.stop and (
            flags.stop_now or now - (flags.stop_requested_at or now) >= self.grace
        )
        with self._lock:
            actions = self._remote_actions(now, stopping) + self._repo_actions(now, stopping)
            if stopping and actions:
                self.cancelled_on_stop = True
        for message, action in actions:
            (log.warning if stopping else log.error)("%s", message)
            action()

    def _remote_actions(self, now: float, stopping: bool) -> list[tuple[str, Callable[[], None]]]:
        remote = self._remote
        if remote is None or not self._remote_watched:
            return []
        if self._remote_cancel is None and (stopping or now >= self._remote_deadline):
            self._remote_cancel = (now, self._statements)
            why = "stopping" if stopping else "remote statement overran its deadline"
            return [(f"{why}: cancelling the remote statement", remote.cancel)]
        if self._remote_cancel is not None:
            cancelled_at, statement = self._remote_cancel
            if now - cancelled_at >= self.ABORT_AFTER and statement == self._statements:
                self._remote_watched = False
                return [("the remote server ignores the cancel: dropping its connection",
                         remote.abort)]
        return []

    def _repo_actions(self, now: float, stopping: bool) -> list[tuple[str, Callable[[], None]]]:
        repo = self._repo
        if repo is None:
            return []
        if self._repo_cancel is None and (stopping or now >= self._repo_deadline):
            self._repo_cancel = now
            why = "stopping" if stopping else "snapshot overran its deadline on the repository"
            return [(f"{why}: cancelling the repository statement",
                     lambda: pg.cancel(repo))]
        if self._repo_cancel is not None and now - self._repo_cancel >= self.ABORT_AFTER:
            self._repo = None
            return [("the repository ignores the cancel: dropping its connection",
                     lambda: pg.abort(repo))]
        return []
