"""One snapshot of a worker's server, in one repository session, under the watchdog.

What fails is handed to ``Failures`` (status, retries, powa-web's errors);
``take()`` returns the stored result, or None.
"""

from __future__ import annotations

import logging
import time

import psycopg

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


class Taker:
    def __init__(self, cfg: Config, link: RemoteLink, watchdog: Watchdog,
                 failures: Failures, refresh: CatalogRefresh) -> None:
        self.cfg = cfg
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
        with repository.session(self.cfg.repository.dsn, f"worker {srvid}",
                                self.cfg.repository.connect_timeout,
                                statement_timeout=repository_budget(frequency) + 60) as repo:
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
        self.state.repository_down = False
        return result
