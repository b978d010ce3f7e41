"""PoWA 5's per-database part of a snapshot: db modules and catalogs, database by database.

Statistics such as ``pg_stat_all_tables`` and catalogs such as ``pg_class``
only show the database a session is connected to, so each database of the
remote (``datallowconn``) that has something to collect is visited:

* a db module (``powa_db_functions``) applies to every database, or to those
  listed in its ``dbnames``;
* catalogs (``powa_catalog_functions``) are due in a database that was never
  refreshed, refreshed over a year ago, or named by REFRESH_DB_CAT;
* a database with neither is not visited at all, so connecting to it costs
  nothing (upstream opens a session to every database at every snapshot).

The database the worker's session is connected to (the powa database) is
read on that session; the others through one short-lived session at a time,
closed as soon as its database is done, so a snapshot never holds more than
two sessions on the remote, whatever the number of databases (keeping them
open between snapshots would hold one idle backend per database on the
remote for the whole period, its ``max_connections`` spent on a collector).

Rows go into ``tmp_table`` prefixed with ``srvid, ts, dbid`` (db modules; ts
is the transaction time of the snapshot's global sources, so every row of a
snapshot carries one time) or ``srvid, dbid`` (catalogs), each source under
a repository savepoint of its own: a failing source is recorded and the
others go on; a database that cannot be reached is recorded and the next
one visited.  A database whose catalogs are read is all or nothing (one
remote transaction, savepoints per source on both sides, under a repository
savepoint): catalogs must agree with each other.  Otherwise (the steady
state: db modules only) each COPY is a statement of its own, on a session
whose settings came with the connection: a visit costs a connection and one
statement per source, each COPY statement composed once for all databases.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from collector.errors import RemoteUnavailable, SnapshotAborted
from collector.logs import one_line
from collector.pg import Conn
from collector.worker.remote import RemoteSession
from collector.worker.sources import DbSource, target_name
from collector.worker.streaming import Guard, stream

if TYPE_CHECKING:
    from collector.worker.snapshot import SnapshotResult

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- REFRESH_DB_CAT
@dataclass(frozen=True)
class RefreshRequest:
    """Databases whose catalogs must be read again, whatever their last refresh."""

    every: bool
    dbnames: frozenset[str] = frozenset()

    def covers(self, dbname: str) -> bool:
        return self.every or dbname in self.dbnames

    def merge(self, other: RefreshRequest | None) -> RefreshRequest:
        if other is None:
            return self
        if self.every or other.every:
            return RefreshRequest(True)
        return RefreshRequest(False, self.dbnames | other.dbnames)


class CatalogRefresh:
    """Requests queued for the next snapshot (filled by the command thread).

    Requests add up (upstream crashes on a second one): no name means every
    database.  A snapshot ``take()``s them, and ``give_back()``s them if it
    was not stored, so that a request is never lost.  The worker's command
    thread and its snapshots share one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: RefreshRequest | None = None

    def request(self, dbnames: Sequence[str]) -> None:
        wanted = RefreshRequest(not dbnames, frozenset(dbnames))
        with self._lock:
            self._pending = wanted.merge(self._pending)

    def take(self) -> RefreshRequest | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def give_back(self, request: RefreshRequest | None) -> None:
        if request is not None:
            with self._lock:
                self._pending = request.merge(self._pending)


# ---------------------------------------------------------------- planning
@dataclass
class DatabaseWork:
    dbname: str
    sources: list[DbSource] = field(default_factory=list)


def plan(
    dbnames: Sequence[str], modules: Sequence[DbSource], catalogs: Sequence[DbSource],
    refresh: RefreshRequest | None,
) -> list[DatabaseWork]:
    """The databases to visit and what to read in each; the others are skipped."""
    work = []
    for dbname in dbnames:
        wanted = [m for m in modules if m.wanted_in(dbname)]
        forced = refresh is not None and refresh.covers(dbname)
        wanted += [c for c in catalogs if forced or dbname not in c.excluded]
        if wanted:
            work.append(DatabaseWork(dbname, wanted))
    return work


def source_query(source: DbSource, srvid: int, ts: datetime) -> sql.Composed:
    """``COPY (srvid, [ts,] dbid, <the source's columns>) TO STDOUT`` for one database."""
    prefix = [sql.Literal(srvid)] + ([sql.Literal(ts)] if source.with_ts else [])
    # the source text is PoWA's own SQL, stored in the repository's powa schema;
    # the line break ends a trailing comment it may have
    return sql.SQL(
        "COPY (SELECT {}, d.dbid, src.* FROM ({}\n) AS src,"
        " (SELECT oid AS dbid FROM pg_catalog.pg_database"
        " WHERE datname = pg_catalog.current_database()) AS d) TO STDOUT"
    ).format(sql.SQL(", ").join(prefix), sql.SQL(source.query_source))


# ---------------------------------------------------------------- copying
class DatabaseCopier:
    """Copies the per-database sources of one snapshot (see the module docstring)."""

    def __init__(
        self, repo: Conn, remote: RemoteSession, result: SnapshotResult, *,
        ts: datetime, home: str, deadline: float, guard: Guard,
    ) -> None:
        self.repo = repo
        self.remote = remote
        self.result = result
        self.ts = ts
        #: the database of the worker's own session
        self.home = home
        self.deadline = deadline
        self.guard = guard
        #: sessions opened to other databases, for benchmarks and logs
        self.sessions_opened = 0
        #: each source's two COPY statements, composed once for every database
        self._statements: dict[str, tuple[bytes, bytes]] = {}

    def run(self, work: Sequence[DatabaseWork]) -> None:
        """Visit each database in turn, while the remote budget lasts."""
        for n, item in enumerate(work):
            if time.monotonic() >= self.deadline:
                self._error(f"Snapshot exceeded its budget on the remote server: skipped"
                            f" databases {', '.join(w.dbname for w in work[n:])}")
                break
            self._database(item)

    def _error(self, error: str) -> None:
        log.warning("%s", error)
        self.result.errors.append(error)

    def _abort_if_cancelled(self) -> None:
        if self.guard.cancelled():
            raise SnapshotAborted("snapshot cancelled: nothing of it is stored")

    def _budget_ms(self) -> int:
        return max(1, int((self.deadline - time.monotonic()) * 1000))

    def _session(self, dbname: str) -> Conn | None:
        if dbname == self.home:
            return self.remote.conn
        self.guard.remote_statement()
        try:
            conn = self.remote.open_database(dbname, self._budget_ms())
        except psycopg.Error as exc:
            self.remote.close_database()
            self._abort_if_cancelled()
            self._error(f"Could not connect to remote database {dbname}: {one_line(exc)}")
            return None
        self.sessions_opened += 1
        return conn

    def _database(self, item: DatabaseWork) -> None:
        """One database (see ``_atomic``)."""
        conn = self._session(item.dbname)
        if conn is None:
            return
        try:
            with self._atomic(conn, item) as atomic:
                for source in item.sources:
                    self._copy(conn, item.dbname, source, atomic)
        except psycopg.Error as exc:
            self._lost(conn, item.dbname, exc)
        finally:
            if conn is not self.remote.conn:
                self.remote.close_database()

    @contextlib.contextmanager
    def _atomic(self, conn: Conn, item: DatabaseWork) -> Iterator[bool]:
        """All or nothing of a database when its catalogs are read (they must agree
        with each other) or on the worker's own session (whose deadline is set per
        transaction): one remote transaction, under a repository savepoint; True.

        Else (db modules only, the steady state) each source is a statement of
        its own on a session that came with its deadline, and its rows are whole
        by themselves: nothing to spend on transactions; False.
        """
        if conn is not self.remote.conn and all(s.with_ts for s in item.sources):
            yield False
            return
        with self.repo.transaction(), conn.transaction():
            self.guard.remote_statement()
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(self._budget_ms())))
            yield True

    def _statements_of(self, source: DbSource) -> tuple[bytes, bytes]:
        if source.name not in self._statements:
            assert source.target is not None
            query = source_query(source, self.result.srvid, self.ts)
            target = sql.SQL("COPY {} FROM STDIN").format(target_name(source.target))
            self._statements[source.name] = (query.as_bytes(self.repo), target.as_bytes(self.repo))
        return self._statements[source.name]

    def _lost(self, conn: Conn, dbname: str, exc: psycopg.Error) -> None:
        """A database's session failed: what it copied in a transaction is rolled back."""
        if self.repo.broken:
            raise exc
        home = self.remote.conn
        if home is None or home.broken or home.closed:
            # the worker's own session went too (a frozen server's sockets are shut down)
            self.remote.close()
            raise RemoteUnavailable(one_line(exc)) from None
        self._abort_if_cancelled()
        self._error(f"Error on remote database {dbname}: {one_line(exc)}")

    def _copy(self, conn: Conn, dbname: str, source: DbSource, atomic: bool) -> bool:
        """One source of one database under savepoints (on the remote, in a
        transaction); False (recorded) if it failed."""
        self._abort_if_cancelled()
        query, target = self._statements_of(source)
        remote_savepoint = conn.transaction() if atomic else contextlib.nullcontext()
        try:
            with self.repo.transaction(), remote_savepoint:
                self.guard.remote_statement()
                rows = stream(conn, query, self.repo, target)
        except psycopg.Error as exc:
            if conn.broken or self.repo.broken:
                raise
            self._abort_if_cancelled()
            self._error(f"Error retrieving datasource data {source.name} in database"
                        f" {dbname}: {one_line(exc)}")
            return False
        self.result.rows[source.name] = self.result.rows.get(source.name, 0) + rows
        return True
