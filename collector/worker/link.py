"""A worker's connection to its remote server, and when to try it again.

The session stays open between snapshots; when it is lost, attempts back
off exponentially (with jitter, at most one period apart).  Every remote
statement outside a snapshot (connection set-up, reading versions) runs
under the watchdog's deadline, as a snapshot's source queries do, so that a
frozen backend cannot hold the worker.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator

import psycopg

from collector.backoff import Backoff
from collector.errors import RemoteUnavailable
from collector.logs import one_line
from collector.repository import Server
from collector.worker.remote import RemoteSession
from collector.worker.watchdog import Watchdog

log = logging.getLogger("collector.worker")

#: the remote's PostgreSQL and extension versions are read again this often (seconds)
VERSIONS_EVERY = 3600.0
#: statements outside a snapshot that hang on the repository side are cut after this
SETUP_BUDGET = 600.0


class RemoteLink:
    def __init__(self, connect_timeout: int, watchdog: Watchdog, rng: random.Random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connect_timeout = connect_timeout
        self.watchdog = watchdog
        self.clock = clock
        self.session: RemoteSession | None = None
        self.backoff = Backoff(maximum=60.0, rng=rng)
        self.next_attempt = 0.0

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.connected

    def due(self, now: float) -> bool:
        """Is a new connection attempt due?"""
        return not self.connected and now >= self.next_attempt

    def adopt(self, previous: Server | None, server: Server) -> None:
        """The server row was (re)read: reconnect if its connection settings changed.

        Like upstream's reload, an unchanged connection has its versions read
        again, and a lost one is retried at once.
        """
        if previous is None or _connection_changed(previous, server) or self.session is None:
            self.close()
            self.session = RemoteSession(server, self.connect_timeout)
            self.retry_now()
        elif self.session.connected:
            try:
                with self.deadline():
                    self.session.refresh_versions()
            except psycopg.Error:
                self.session.close()
        else:
            self.retry_now()

    def retry_now(self) -> None:
        self.next_attempt = self.clock()
        self.backoff.reset()

    @contextlib.contextmanager
    def deadline(self) -> Iterator[None]:
        """Remote statements outside a snapshot end in time (see the module docstring)."""
        assert self.session is not None
        now = self.clock()
        self.watchdog.arm(self.session, now + SETUP_BUDGET)
        self.watchdog.remote_begin(now + 2 * self.connect_timeout)
        try:
            yield
        finally:
            self.watchdog.remote_end()
            self.watchdog.disarm()

    def connect(self) -> str | None:
        """Connect; None when done, else why not (the caller reports it)."""
        assert self.session is not None
        try:
            with self.deadline():
                self.session.connect()
        except RemoteUnavailable as exc:
            return f"cannot connect to the remote server: {exc}"
        if self.backoff.active:
            log.info("connected to the remote server again")
        self.backoff.reset()
        return None

    def lost(self, period: float | None) -> None:
        """The remote is unreachable: close, and schedule the next attempt."""
        self.close()
        delay = self.backoff.next_delay()
        if period is not None:
            delay = min(delay, period)
        self.next_attempt = self.clock() + delay

    def versions_current(self) -> str | None:
        """Read the remote's versions again now and then (extensions get upgraded).

        None when fine, else why the remote is considered lost.
        """
        assert self.session is not None
        if self.clock() - self.session.versions_read_at < VERSIONS_EVERY:
            return None
        try:
            with self.deadline():
                self.session.refresh_versions()
        except psycopg.Error as exc:
            return f"remote server lost: {one_line(exc)}"
        return None

    def watched_fd(self) -> list[int]:
        """The idle connection's socket: it turns readable when the server hangs up."""
        fd = self.session.fileno() if self.session is not None else None
        return [fd] if fd is not None else []

    def check_alive(self) -> bool:
        return self.session is not None and self.session.check_alive()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def _connection_changed(old: Server, new: Server) -> bool:
    return (old.hostname, old.port, old.username, old.password, old.dbname) != (
        new.hostname, new.port, new.username, new.password, new.dbname
    )
