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

    It sleeps on a pipe of its own while nothing runs: the signal handlers
    only write to that pipe (no lock is taken in a handler).
    """

    ABORT_AFTER = 5.0

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

    # ---------------------------------------------------------------- the worker's side
    def arm(self, remote: RemoteSession, repo_deadline: float) -> None:
        """A snapshot starts; its repository part must end by ``repo_deadline``."""
        with self._lock:
            self._remote, self._remote_watched, self._remote_cancel = remote, False, None
            self._repo, self._repo_deadline, self._repo_cancel = None, repo_deadline, None
            self.cancelled_on_stop = False
        self._wakeup.notify()

    def watch_repository(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._repo = conn

    def disarm(self) -> None:
        with self._lock:
            self._remote = self._repo = None
            self._remote_watched = False

    def close(self) -> None:
        self._closing = True
        self._wakeup.notify()

    # ---------------------------------------------------------------- the snapshot's side
    def remote_begin(self, deadline: float) -> None:
        with self._lock:
            self._remote_deadline, self._remote_watched = deadline, True
            self._remote_cancel = None

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
            with self._lock:
                busy = self._remote is not None or self._repo is not None
            # poll while a snapshot runs or a stop is under way; sleep otherwise
            self._wakeup.wait(0.2 if busy or self.flags.stop else 3600)
            try:
                self.check(time.monotonic())
            except Exception:
                # a dead watchdog would leave every later snapshot without deadlines
                log.exception("watchdog check failed; watching on")
        self._wakeup.close()

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
