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

Reading: the database the worker's session is connected to (the powa
database) is read on that session; the others through short-lived sessions,
each closed as soon as its database is done.  Two databases are read at
once (two readers, each one session at a time: one in a thread), so that
one's connection and queries overlap the other's; a snapshot never holds
more than three sessions on the remote, whatever the number of databases
(keeping them open between snapshots would hold one idle backend per
database on the remote for the whole period).  Each source's rows, prefixed
with ``srvid, ts, dbid`` (db modules; ts is the transaction time of the
snapshot's global sources, so every row of a snapshot carries one time) or
``srvid, dbid`` (catalogs) by the remote's query itself, go verbatim into a
spool of the reader (collector.worker.streaming: memory, then a temporary
file).  A failing source is recorded and the others go on; a database that
cannot be reached is recorded and the next one visited.  A database is all
or nothing: a session lost midway takes back all its rows.  Each COPY is a
statement of its own, on a session whose settings came with the connection
(a visit costs a connection and one statement per source); the worker's own
session reads its database in a transaction of its own, with a savepoint
per source.

Storing (collector.worker.streaming.store, with the global sources): one
COPY per source into its ``tmp_table``, of every database's rows; should
the repository refuse it, each database's rows are stored on their own
under savepoints, so that only the failing ones are lost and recorded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from collector.errors import RemoteUnavailable, SnapshotAborted
from collector.logs import one_line
from collector.pg import Conn
from collector.worker.remote import RemoteSession
from collector.worker.sources import DbSource, copy_in
from collector.worker.streaming import Guard, Load, Spool, command

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
#: databases read at once (each reader holds one remote session at a time)
READERS = 2


class DatabaseCopier:
    """Reads the per-database sources of one snapshot (see the module docstring)."""

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
        #: set when a reader fails: the other one starts no new database
        self.stopped = threading.Event()
        #: the readers' spools, closed by close() once the loads are stored
        self.spools: list[Spool] = []

    def read(self, work: Sequence[DatabaseWork]) -> list[Load]:
        """Read each database while the remote budget lasts; what to store, per source."""
        if not work:
            return []
        sources = {s.name: s for item in work for s in item.sources}
        queries = {name: source_query(s, self.result.srvid, self.ts).as_bytes(self.repo)
                   for name, s in sources.items()}
        readers = [DatabaseReader(self, queries) for _ in range(min(READERS, len(work)))]
        self.spools = [reader.spool for reader in readers]
        try:
            self._read(readers, work)
        except RemoteUnavailable:
            self.remote.close()
            raise
        finally:
            self.sessions_opened = sum(r.sessions_opened for r in readers)
        self._record(readers)
        return self._loads(work)

    def close(self) -> None:
        for spool in self.spools:
            spool.close()

    def _read(self, readers: list[DatabaseReader], work: Sequence[DatabaseWork]) -> None:
        """The first reader in this thread, the other in a thread of its own."""
        todo = deque(enumerate(work))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="databases") as pool:
            others = [pool.submit(reader.run, todo) for reader in readers[1:]]
            try:
                readers[0].run(todo)
            except BaseException:
                futures.wait(others)
                raise
            for other in others:
                other.result()

    def _record(self, readers: list[DatabaseReader]) -> None:
        """The readers' errors, in the order of the databases."""
        found = sorted(e for r in readers for e in r.errors)
        self.result.errors += [error for _, error in found]
        skipped = sorted(s for r in readers for s in r.skipped)
        if skipped:
            error = (f"Snapshot exceeded its budget on the remote server: skipped"
                     f" databases {', '.join(name for _, name in skipped)}")
            log.warning("%s", error)
            self.result.errors.append(error)

    def _loads(self, work: Sequence[DatabaseWork]) -> list[Load]:
        """One load per source, of every database's rows."""
        sources = {s.name: s for item in work for s in item.sources}
        loads = {name: Load(name, name, _target(source, self.repo))
                 for name, source in sources.items()}
        for spool in self.spools:
            for part in spool.parts:
                loads[part.source].parts.append(part)
        return [load for load in loads.values() if load.parts]

    def abort_if_cancelled(self) -> None:
        if self.guard.cancelled():
            raise SnapshotAborted("snapshot cancelled: nothing of it is stored")

    def budget_ms(self) -> int:
        return max(1, int((self.deadline - time.monotonic()) * 1000))


def _target(source: DbSource, repo: Conn) -> bytes:
    assert source.target is not None
    return copy_in(repo, source.target)


class DatabaseReader:
    """Reads databases one after the other, one remote session at a time, into its spools."""

    def __init__(self, copier: DatabaseCopier, queries: dict[str, bytes]) -> None:
        self.copier = copier
        self.remote = copier.remote
        self.queries = queries
        self.spool = Spool()
        self.sessions_opened = 0
        #: (database's position, message), merged by the copier
        self.errors: list[tuple[int, str]] = []
        self.skipped: list[tuple[int, str]] = []

    def run(self, todo: deque[tuple[int, DatabaseWork]]) -> None:
        """Take databases from ``todo`` until none is left (or the other reader failed)."""
        try:
            while not self.copier.stopped.is_set():
                try:
                    index, item = todo.popleft()
                except IndexError:
                    return
                if time.monotonic() >= self.copier.deadline:
                    self.skipped.append((index, item.dbname))
                else:
                    self._database(index, item)
        except BaseException:
            self.copier.stopped.set()
            raise

    def _error(self, index: int, error: str) -> None:
        log.warning("%s", error)
        self.errors.append((index, error))

    def _session(self, index: int, dbname: str) -> Conn | None:
        if dbname == self.copier.home:
            return self.remote.conn
        self.copier.guard.remote_statement()
        try:
            conn = self.remote.open_database(dbname, self.copier.budget_ms())
        except psycopg.Error as exc:
            self.copier.abort_if_cancelled()
            self._error(index, f"Could not connect to remote database {dbname}: {one_line(exc)}")
            return None
        self.sessions_opened += 1
        return conn

    def _database(self, index: int, item: DatabaseWork) -> None:
        """One database (see ``_atomic``); if its session fails, none of its rows is kept."""
        conn = self._session(index, item.dbname)
        if conn is None:
            return
        mark = self.spool.mark()
        try:
            with self._atomic(conn) as atomic:
                for source in item.sources:
                    self._copy(index, conn, item.dbname, source, atomic)
        except psycopg.Error as exc:
            self.spool.rollback(mark)
            self._lost(index, item.dbname, exc)
        finally:
            if conn is not self.remote.conn:
                self.remote.close_database(conn)

    @contextlib.contextmanager
    def _atomic(self, conn: Conn) -> Iterator[bool]:
        """On the worker's own session, whose deadline is set per transaction: one
        remote transaction, a savepoint per source; True.

        Else each source is a statement of its own, on a session that came with
        its deadline: nothing to spend on transactions (in READ COMMITTED, one
        would not make the catalogs agree with each other either: each COPY is
        consistent in itself, and a session lost midway takes back all the
        database's rows); False.
        """
        if conn is not self.remote.conn:
            yield False
            return
        with conn.transaction():
            self.copier.guard.remote_statement()
            command(conn, sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(self.copier.budget_ms())).as_bytes(conn))
            yield True

    def _lost(self, index: int, dbname: str, exc: psycopg.Error) -> None:
        """A database's session failed: what it read is dropped (by the caller)."""
        home = self.remote.conn
        if home is None or home.broken or home.closed:
            # the worker's own session went too (a frozen server's sockets are shut down)
            raise RemoteUnavailable(one_line(exc)) from None
        self.copier.abort_if_cancelled()
        self._error(index, f"Error on remote database {dbname}: {one_line(exc)}")

    def _copy(self, index: int, conn: Conn, dbname: str, source: DbSource, atomic: bool) -> None:
        """One source of one database (under a savepoint in a transaction); recorded if it fails."""
        self.copier.abort_if_cancelled()
        try:
            self.copier.guard.remote_statement()
            self.spool.add(source.name, dbname, conn, self.queries[source.name], savepoint=atomic)
        except psycopg.Error as exc:
            if conn.broken:
                raise
            self.copier.abort_if_cancelled()
            self._error(index, f"Error retrieving datasource data {source.name} in database"
                               f" {dbname}: {one_line(exc)}")
