"""One snapshot of a worker's server, in one repository session, under the watchdog.

What fails is handed to ``Failures`` (status, retries, powa-web's errors);
``take()`` returns the stored result, or None.
"""

from __future__ import annotations

import logging
import select
import time

import psycopg
from psycopg import pq

from collector import repository
from collector.config import Config
from collector.errors import (
    ConcurrentSnapshotError,
    LeaseHeldError,
    RemoteUnavailable,
    RepositoryUnavailable,
    SnapshotAborted,
    SnapshotTooSoon,
)
from collector.pg import Conn
from collector.worker.databases import CatalogRefresh
from collector.worker.failures import Failures
from collector.worker.lease import LeaseCheck
from collector.worker.link import RemoteLink
from collector.worker.snapshot import Snapshot, SnapshotResult
from collector.worker.watchdog import Watchdog

log = logging.getLogger("collector.worker")

#: the repository part of a snapshot gets this long (or ten periods) before it is cancelled:
#: a big aggregation may take long, a repository that never answers must not stall a worker
REPOSITORY_BUDGET = 600.0


def repository_budget(frequency: int) -> float:
    """Seconds the repository part of a snapshot may take before it is cancelled."""
    return max(10.0 * frequency, REPOSITORY_BUDGET)


class RepositorySession:
    """The worker's repository session: opened for each snapshot, or kept between them.

    A server collected every few seconds would open a session (a backend
    forked on the repository, a login, its settings) as often; below
    ``[repository] keep_session_below`` seconds the session is kept, idle,
    between snapshots.  A server collected less often holds no repository
    session while it waits (hundreds of idle backends are the repository's
    memory), as with upstream.

    A kept session is only used again if its last snapshot was committed and
    nothing came from the server since (it only speaks unprompted to end the
    session: a restart, ``idle_session_timeout``, ``pg_terminate_backend``);
    else a new one is opened, and no snapshot is lost to a dead session.
    """

    def __init__(self, cfg: Config, srvid: int) -> None:
        self.cfg = cfg
        self.srvid = srvid
        #: the kept session, and the statement_timeout it was opened with
        self._kept: tuple[Conn, float] | None = None

    def open(self, statement_timeout: float) -> Conn:
        """A session for the next snapshot (RepositoryUnavailable if none can be opened)."""
        if self._kept is not None:
            conn, timeout = self._kept
            self._kept = None
            if timeout == statement_timeout and _reusable(conn):
                return conn
            conn.close()
        conn = repository.connect(self.cfg.repository.dsn, f"worker {self.srvid}",
                                  self.cfg.repository.connect_timeout,
                                  statement_timeout=statement_timeout)
        # as a new session: no statement prepared by an earlier snapshot (a PoWA
        # upgrade in between would make it fail)
        conn.prepare_threshold = None
        return conn

    def done(self, conn: Conn, statement_timeout: float, frequency: int, stored: bool) -> None:
        """The snapshot is over: keep the session for the next one, or close it."""
        # the snapshot gave the session its name back (see Snapshot._take)
        if stored and frequency < self.cfg.repository.keep_session_below and _reusable(conn):
            self._kept = (conn, statement_timeout)
            return
        conn.close()

    def close(self) -> None:
        if self._kept is not None:
            self._kept[0].close()
            self._kept = None


def _reusable(conn: Conn) -> bool:
    """Idle, healthy, and nothing received from the server since its last answer."""
    if conn.closed or conn.broken or conn.info.transaction_status != pq.TransactionStatus.IDLE:
        return False
    try:
        ready, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not ready


class Taker:
    def __init__(self, cfg: Config, link: RemoteLink, watchdog: Watchdog,
                 failures: Failures, refresh: CatalogRefresh) -> None:
        self.cfg = cfg
        self.session = RepositorySession(cfg, failures.state.srvid)
        #: REFRESH_DB_CAT requests waiting for the next snapshot
        self.refresh = refresh
        self.link = link
        self.watchdog = watchdog
        self.failures = failures
        self.state = failures.state

    def take(self, frequency: int, forced: bool = False) -> SnapshotResult | None:
        try:
            result = self._store(frequency, forced)
        except LeaseHeldError as exc:
            self.failures.held_by(exc.holder, str(exc))
            return None
        except SnapshotTooSoon as exc:
            # the lease was free (checked first): this host collects from now on
            log.info("snapshot skipped: %s", exc)
            self.failures.held_by(None)
            self.failures.follow_cadence(exc.age)
            return None
        except RemoteUnavailable as exc:
            self.failures.remote(f"snapshot failed, remote server lost: {exc}", report=True)
        except RepositoryUnavailable as exc:
            self.failures.repository(f"snapshot failed: {exc}")
        except (SnapshotAborted, ConcurrentSnapshotError) as exc:
            self.failures.snapshot(exc, repository_lost=False)
        else:
            self.failures.held_by(None)
            return result
        return None

    def _store(self, frequency: int, forced: bool) -> SnapshotResult | None:
        assert self.link.session is not None
        srvid = self.state.srvid
        self.watchdog.arm(self.link.session, time.monotonic() + repository_budget(frequency))
        # the watchdog cancels at the budget; the server ends what a frozen
        # process left running (a COPY waiting for data) a minute later
        timeout = repository_budget(frequency) + 60
        repo = self.session.open(timeout)
        stored = False
        try:
            self.watchdog.watch_repository(repo)
            snapshot = Snapshot(repo, self.link.session, srvid, budget=frequency,
                                guard=self.watchdog, clear_stale=self.state.snapshots_ok == 0,
                                refresh=self.refresh,
                                lease=LeaseCheck(self.cfg.fleet.host, srvid, frequency, forced))
            try:
                result = snapshot.run()
            except psycopg.Error as exc:
                self.failures.snapshot(exc, repository_lost=repo.broken)
                return None
            stored = result.committed
        finally:
            self.session.done(repo, timeout, frequency, stored)
        self.state.repository_down = False
        return result

    def close(self) -> None:
        self.session.close()
