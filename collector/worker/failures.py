"""What a worker does when something fails: its status, its next attempt, powa-web's errors.

A remote that cannot be reached is retried with backoff (``RemoteLink``); a
repository that cannot be reached turns the status to ``no connection to
repository server``; a snapshot that fails says why in the status, and,
where powa-web should show it, in ``powa_snapshot_metas.errors``.  Each
error is logged once while it stays the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from collector import logs, repository
from collector.config import Config
from collector.errors import ConcurrentSnapshotError, RepositoryUnavailable, SnapshotAborted
from collector.wakeup import SignalFlags
from collector.worker.link import RemoteLink
from collector.worker.reporter import Reporter

log = logging.getLogger("collector.worker")


#: a worker whose server's lease is held elsewhere looks again this often (seconds) at most
LEASE_RETRY = 15.0


class Failures:
    def __init__(self, cfg: Config, reporter: Reporter, link: RemoteLink,
                 flags: SignalFlags, publish: Callable[[], None]) -> None:
        self.cfg = cfg
        self.srvid = reporter.state.srvid
        self.reporter = reporter
        self.state = reporter.state
        self.link = link
        self.flags = flags
        self.publish = publish

    def error(self, error: str) -> None:
        self.reporter.error(error)
        self.publish()

    def remote(self, error: str, report: bool) -> None:
        """The remote is unreachable: status, next attempt, and maybe the repository's errors."""
        schedule = self.reporter.schedule
        self.link.lost(schedule.frequency if schedule else None)
        self.error(error)
        if report:
            self.report(f"Error connecting to remote server {self.srvid}: {error}")

    def repository(self, error: str) -> None:
        self.state.repository_down = True
        self.error(error)

    def report(self, error: str) -> None:
        """Store a failure in powa_snapshot_metas.errors, where powa-web shows it."""
        try:
            repository.report_failure(
                self.cfg.repository.dsn, self.srvid, error, self.cfg.repository.connect_timeout
            )
        except RepositoryUnavailable as exc:
            self.repository(str(exc))
            return
        except psycopg.Error as exc:
            log.warning("could not store the error in the repository: %s", logs.one_line(exc))
            return
        if self.state.repository_down:
            self.state.repository_down = False
            self.publish()

    def held_by(self, host: str | None, reason: str = "") -> None:
        """Another host holds the server's lease (None: this worker stored a snapshot).

        Not an error of the server: the status says which host collects it, and the
        next attempt comes soon (a handover ends as soon as the other host lets go).
        """
        if host == self.state.held_by:
            return
        self.state.held_by = host
        if host is not None:
            log.warning("not collecting: %s", reason)
            if self.reporter.schedule is not None:
                self.reporter.schedule.retry(time.monotonic(), LEASE_RETRY)
        else:
            log.info("collecting: this host holds the lease")
        self.publish()

    def follow_cadence(self, age: float) -> None:
        """Another collector snapshotted ``age`` seconds ago: the next one is a period after
        it (not after this attempt), so a handover neither doubles nor stretches a period."""
        schedule = self.reporter.schedule
        if schedule is not None:
            schedule.next_due = time.monotonic() + max(1.0, schedule.frequency - age)

    def snapshot(self, exc: Exception, repository_lost: bool) -> None:
        """A snapshot that ended in an error, rolled back whole."""
        reason = logs.one_line(exc)
        if self.flags.stop:
            self.error(f"snapshot cancelled and rolled back on stop: {reason}")
        elif repository_lost:
            self.repository(f"snapshot failed and rolled back: {reason}")
        elif isinstance(exc, ConcurrentSnapshotError | SnapshotAborted):
            self.error(f"snapshot skipped: {reason}")
        else:
            self.error(f"snapshot failed and rolled back: {reason}")
