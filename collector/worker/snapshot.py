"""One remote snapshot of one server, stored exactly as PoWA 4.1 and PoWA 5 expect.

For each enabled source of ``powa_functions`` (operation ``snapshot``), the
rows of ``<schema>.<query_source>(0)`` on the remote, prefixed with the
server id, go into ``<schema>.<query_source>_tmp`` on the repository.  On
PoWA 5, the per-database modules and catalogs follow, database by database
(collector.worker.databases); what to copy is read as the repository's PoWA
version describes it (collector.worker.sources).  Then
``powa_take_snapshot(N)`` turns those rows into history.

The remote part comes first (``Reading``): every source is read, as the
remote's COPY text, into spools (memory, then a temporary file: a worker's
memory does not grow with the number of statements or databases); the
global sources in one remote transaction (every source sees the same
``now()``, as with upstream) committed before the repository work.  Then
the repository part: one COPY per source, all under one savepoint
(collector.worker.streaming.store).

Every repository write of the snapshot happens in one transaction:

* it starts by locking the server's ``powa_snapshot_metas`` row (NOWAIT), so
  two snapshots of one server can never overlap, whichever process runs them;
* PoWA must have the same major.minor version on both sides, and the list of
  sources must be readable: otherwise nothing is copied and the reason is
  stored in ``powa_snapshot_metas.errors``;
* a source that fails on the remote is recorded and the others continue
  (a savepoint per source there); one the repository refuses is rolled back
  (no half-copied rows stay) and recorded, the others stored (the sources
  are then stored again one by one, and a refused per-database source
  database by database, each under a savepoint);
* if ``powa_take_snapshot`` itself fails, everything copied is rolled back and
  only the error is stored (upstream commits the ``_tmp`` rows in that case,
  and the next snapshot stores them again);
* the server's ``_tmp`` rows left by a snapshot function that failed inside
  ``powa_take_snapshot`` are removed before commit;
* the errors of the run are appended to ``powa_snapshot_metas.errors`` after
  ``powa_take_snapshot`` (which clears that column first).

``query_cleanup`` (e.g. ``pg_qualstats_reset()``) runs on the remote only
once the snapshot is committed, for the sources that were stored (upstream
runs it right after each source, even a failed one: data that never reached
the repository is thrown away).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from collector.errors import ConcurrentSnapshotError, RemoteUnavailable, SnapshotAborted
from collector.logs import one_line
from collector.pg import Conn, PowaExtension, composed
from collector.repository import record_errors, require_powa, save_versions
from collector.worker import sources as discovery
from collector.worker.databases import CatalogRefresh, DatabaseCopier, RefreshRequest, plan
from collector.worker.remote import RemoteSession
from collector.worker.sources import DbSource, Source, copy_in
from collector.worker.streaming import CHUNK_SIZE, Guard, Load, Spool, command, store

__all__ = ["CHUNK_SIZE", "Guard", "Snapshot", "SnapshotResult", "Source"]

log = logging.getLogger(__name__)

_REMOTE_DATABASES = """
SELECT pg_catalog.now(), pg_catalog.current_database(),
       ARRAY(SELECT datname::text FROM pg_catalog.pg_database WHERE datallowconn ORDER BY datname)
"""


@dataclass
class SnapshotResult:
    srvid: int
    started_at: float
    duration: float = 0.0
    #: rows copied per module, for the sources that succeeded
    rows: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: error count returned by powa_take_snapshot (its details are in the repository)
    take_snapshot_errors: int = 0
    #: nothing but errors was stored (version mismatch, powa_take_snapshot failed)
    failed: bool = False
    committed: bool = False
    #: seconds spent in each phase, for benchmarks and logs
    timings: dict[str, float] = field(default_factory=dict)
    #: PoWA 5: databases of the remote read, and sessions opened for them
    databases: int = 0
    sessions_opened: int = 0

    @property
    def outcome(self) -> str:
        if self.failed or not self.committed:
            return "failed"
        return "errors" if self.errors or self.take_snapshot_errors else "ok"

    @property
    def error_count(self) -> int:
        return len(self.errors) + self.take_snapshot_errors


@dataclass
class Plan:
    """What one snapshot copies: global sources, and on PoWA 5 per-database ones."""

    sources: list[Source]
    modules: list[DbSource] = field(default_factory=list)
    catalogs: list[DbSource] = field(default_factory=list)
    refresh: RefreshRequest | None = None

    @property
    def per_database(self) -> bool:
        return bool(self.modules or self.catalogs)

    def tmp_tables(self) -> set[tuple[str, str]]:
        return discovery.tmp_tables(self.sources, self.modules + self.catalogs)


def _lock_server(repo: Conn, powa: PowaExtension, srvid: int) -> None:
    """Lock the server's metas row for the whole transaction: one snapshot at a time."""
    try:
        row = repo.execute(composed(repo, ("lock metas", powa.schema), lambda: sql.SQL(
            "SELECT 1 FROM {} WHERE srvid = %s FOR UPDATE NOWAIT"
        ).format(powa.name("powa_snapshot_metas"))), (srvid,)).fetchone()
    except psycopg.errors.LockNotAvailable:
        repo.rollback()
        raise ConcurrentSnapshotError(
            f"another snapshot of server {srvid} is running (its powa_snapshot_metas row is locked)"
        ) from None
    if row is None:
        repo.rollback()
        raise SnapshotAborted(f"server {srvid} has no powa_snapshot_metas row: not registered?")


def _clear_tmp(repo: Conn, srvid: int, tables: set[tuple[str, str]]) -> None:
    if not tables:
        return
    statements = sql.SQL("; ").join(
        sql.SQL("DELETE FROM {} WHERE srvid = {}").format(
            sql.Identifier(*table), sql.Literal(srvid)
        )
        for table in sorted(tables)
    )
    repo.execute(statements)


class Snapshot:
    """Takes one snapshot; ``run()`` returns a SnapshotResult or raises.

    The remote part (the sources, then their cleanups) must end within
    ``budget`` seconds: past it, no new source is started.  ``clear_stale``
    first deletes the server's rows left in the ``_tmp`` tables by someone
    else (a worker does it once, at its first snapshot: the deletes scan tables
    full of dead rows, not worth paying every time).  ``refresh`` holds the
    REFRESH_DB_CAT requests (PoWA 5), the server's queue by default: taken
    by this snapshot, given back if it is not stored.
    Exceptions: RemoteUnavailable when the remote connection is lost,
    ConcurrentSnapshotError, SnapshotAborted, psycopg.Error from the repository.
    """

    def __init__(
        self,
        repo: Conn,
        remote: RemoteSession,
        srvid: int,
        *,
        budget: float,
        guard: Guard | None = None,
        clear_stale: bool = False,
        refresh: CatalogRefresh | None = None,
        lease: Callable[[Conn, PowaExtension], None] | None = None,
    ) -> None:
        self.repo = repo
        #: is this server ours to collect (collector.worker.lease), asked under the row lock
        self.lease = lease
        self.remote = remote
        self.srvid = srvid
        self.budget = budget
        self.guard = guard or Guard()
        self.clear_stale = clear_stale
        self.refresh = refresh or CatalogRefresh()
        self.result = SnapshotResult(srvid=srvid, started_at=time.time())

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.result.timings[name] = self.result.timings.get(name, 0.0) + now - since
        return now

    def run(self) -> SnapshotResult:
        """Take the snapshot in one repository transaction, committed at the end."""
        started = time.perf_counter()
        powa = require_powa(self.repo)
        _lock_server(self.repo, powa, self.srvid)
        if self.lease is not None:
            try:
                self.lease(self.repo, powa)
            except SnapshotAborted:
                self.repo.rollback()
                raise
        refresh = self.refresh.take()
        try:
            self._run(powa, refresh, started)
        finally:
            if self.result.outcome == "failed":
                self.refresh.give_back(refresh)
        return self.result

    def _run(self, powa: PowaExtension, refresh: RefreshRequest | None, started: float) -> None:
        repo, srvid = self.repo, self.srvid
        work = self._prepare(powa, refresh)
        mark = self._phase("prepare", started)
        copied: list[Source] = []
        versions_saved = False
        if work is not None:
            if not work.sources:
                log.info("no snapshot source enabled for server %d", srvid)
            if self.clear_stale:
                _clear_tmp(repo, srvid, work.tmp_tables())
            with repo.transaction() as data:
                copied = self._copy_all(powa, work)
                mark = self._phase("sources", mark)
                self._take(powa, data)
                mark = self._phase("powa_take_snapshot", mark)
            if self.result.take_snapshot_errors:
                # a snapshot function failed inside powa_take_snapshot: its rows are left
                _clear_tmp(repo, srvid, work.tmp_tables())
            if self.result.errors:
                # after a failed powa_take_snapshot the old errors are still there
                record_errors(repo, powa, srvid, self.result.errors, replace=self.result.failed)
            versions_saved = self._save_versions(powa)
        repo.commit()
        if versions_saved:
            self.remote.versions_pending = False
        self.result.committed = True
        if not self.result.failed:
            AfterCommit(self, powa).cleanup(copied)
        self._phase("commit", mark)
        self.result.duration = time.perf_counter() - started

    # ------------------------------------------------------------------ before copying
    def _prepare(self, powa: PowaExtension, refresh: RefreshRequest | None) -> Plan | None:
        """What to copy; None (the reason stored) when nothing may be copied."""
        if not self._compatible(powa):
            return None
        try:
            with self.repo.transaction():
                return self._discover(powa, refresh)
        except psycopg.Error as exc:
            if self.repo.broken:
                raise
            self._fail(powa, f"Error while getting the snapshot sources of server"
                             f" {self.srvid}: {one_line(exc)}")
            return None

    def _discover(self, powa: PowaExtension, refresh: RefreshRequest | None) -> Plan:
        remote = self.remote
        assert remote.powa is not None
        found = discovery.global_sources(self.repo, powa, self.srvid, remote.powa, remote.schemas)
        if powa.major < 5:
            return Plan(found)
        version = remote.server_version_num
        every = refresh is not None and refresh.every
        per_db = (discovery.db_modules(self.repo, powa, self.srvid, version),
                  discovery.catalogs(self.repo, powa, self.srvid, version, every))
        kept: tuple[list[DbSource], list[DbSource]] = ([], [])
        for found_kind, kept_kind in zip(per_db, kept, strict=True):
            for source in found_kind:
                if source.target is None or not source.query_source:
                    self.result.errors.append(
                        f"Datasource {source.name}: no query_source or no _tmp table on"
                        " the repository server, skipped")
                else:
                    kept_kind.append(source)
        return Plan(found, kept[0], kept[1], refresh)

    def _compatible(self, powa: PowaExtension) -> bool:
        """Same PoWA major.minor on both sides, else record why and copy nothing."""
        remote_powa = self.remote.powa
        if remote_powa is None:
            self._fail(powa, f"PoWA extension not found on remote server {self.srvid}")
            return False
        if remote_powa.major_minor != powa.major_minor:
            self._fail(powa, (
                "Incompatible PoWA version between the repository server "
                f"({'.'.join(powa.major_minor)}.X) and the remote host "
                f"({'.'.join(remote_powa.major_minor)}.X)"
            ))
            return False
        return True

    def _fail(self, powa: PowaExtension, error: str) -> None:
        """Nothing is copied: the one error replaces the stored ones."""
        self.result.errors.append(error)
        self.result.failed = True
        record_errors(self.repo, powa, self.srvid, [error], replace=True)
        log.error("%s", error)

    def _save_versions(self, powa: PowaExtension) -> bool:
        """Store the remote's versions if they are new; True once they are stored.

        In a savepoint of its own: a lock held on those rows (an ALTER
        EXTENSION, an operator's open transaction) postpones the versions to
        the next snapshot, and never costs this one.
        """
        remote = self.remote
        if not remote.versions_pending:
            return False
        try:
            with self.repo.transaction():
                save_versions(self.repo, powa, self.srvid, server_version=remote.server_version,
                              extensions=remote.extensions, hypopg=remote.hypopg)
        except psycopg.Error as exc:
            if self.repo.broken:
                raise
            log.warning("server %d: versions not saved, next snapshot tries again: %s",
                        self.srvid, one_line(exc))
            return False
        return True

    # ------------------------------------------------------------------ copying
    def _copy_all(self, powa: PowaExtension, work: Plan) -> list[Source]:
        """Read every source from the remote, then store them all; the global sources stored."""
        reading = Reading(self, work)
        try:
            read, loads = reading.run()
            stored = store(self.repo, loads, self.guard, self._refused)
        finally:
            reading.close()
        for load in loads:
            if load.key in stored:
                self.result.rows[load.source] = (self.result.rows.get(load.source, 0)
                                                 + stored[load.key])
        return [source for source in read if _key(source) in stored]

    def _refused(self, source: str, dbname: str | None, exc: psycopg.Error) -> None:
        where = "" if dbname is None else f" in database {dbname}"
        self.record_error(f"Error retrieving datasource data {source}{where}: {one_line(exc)}")

    def record_error(self, error: str) -> None:
        log.warning("%s", error)
        self.result.errors.append(error)

    def abort_if_cancelled(self) -> None:
        if self.guard.cancelled():
            raise SnapshotAborted("snapshot cancelled: nothing of it is stored")

    def _take(self, powa: PowaExtension, data: psycopg.Transaction) -> None:
        """powa_take_snapshot(N); if it fails, roll back every copied row, keep the error."""
        try:
            # powa_take_snapshot renames the session ('PoWA - snapshot finished'): it gets
            # its name back in the same statement.  No savepoint of its own (two round
            # trips): a failure rolls back to ``data``'s.
            name = self.repo.info.parameter_status("application_name") or ""
            row = self.repo.execute(composed(
                self.repo, ("take", powa.schema), lambda: sql.SQL(
                    "SELECT t.errors, pg_catalog.set_config('application_name', %s, false)"
                    " FROM (SELECT {}(%s) AS errors OFFSET 0) AS t",
                ).format(powa.name("powa_take_snapshot")),
            ), (name, self.srvid)).fetchone()
        except psycopg.Error as exc:
            if self.repo.broken:
                raise
            self.abort_if_cancelled()
            error = f"Error while taking snapshot for server {self.srvid}: {one_line(exc)}"
            log.error("%s", error)
            self.result.errors.append(error)
            self.result.failed = True
            raise psycopg.Rollback(data) from None
        self.result.take_snapshot_errors = int(row[0]) if row and row[0] is not None else 0


def _key(source: Source) -> str:
    """A global source's rows are filed under its _tmp table (a name may have several)."""
    assert source.target is not None
    return ".".join(source.target)


class Reading:
    """The remote part of a snapshot: every source read into spools, within its budget.

    The global sources in one remote transaction (every source sees the same
    ``now()``), each under a savepoint; then, on PoWA 5, each database's
    (collector.worker.databases).  Nothing reaches the repository here.
    """

    def __init__(self, snapshot: Snapshot, work: Plan) -> None:
        self.snapshot = snapshot
        self.remote = snapshot.remote
        self.guard = snapshot.guard
        self.work = work
        self.spool = Spool()
        self.copier: DatabaseCopier | None = None

    def close(self) -> None:
        self.spool.close()
        if self.copier is not None:
            self.copier.close()

    def run(self) -> tuple[list[Source], list[Load]]:
        """The global sources read, and the loads to store."""
        remote = self.remote.conn
        if remote is None:
            raise RemoteUnavailable("no connection to remote server")
        deadline = time.monotonic() + self.snapshot.budget
        self.guard.remote_begin(deadline)
        try:
            with remote.transaction():
                read = self._global(remote, deadline)
                found = None
                if self.work.per_database:
                    self.guard.remote_statement()
                    found = remote.execute(_REMOTE_DATABASES).fetchone()
            loads = self._loads(read)
            if found is not None:
                loads += self._databases(found[0], str(found[1]), list(found[2]), deadline)
        except psycopg.OperationalError as exc:
            if remote.closed or remote.broken:
                self.remote.close()
                raise RemoteUnavailable(one_line(exc)) from None
            raise
        finally:
            self.remote.close_database()
            self.guard.remote_end()
        return read, loads

    def _global(self, remote: Conn, deadline: float) -> list[Source]:
        """The global sources, in the remote transaction the caller opened."""
        self.guard.remote_statement()
        budget_ms = int(self.snapshot.budget * 1000)
        command(remote, composed(remote, ("statement_timeout", budget_ms), lambda: sql.SQL(
            "SET LOCAL statement_timeout = {}").format(sql.Literal(budget_ms))))
        read = []
        sources = self.work.sources
        for n, source in enumerate(sources):
            if time.monotonic() >= deadline:
                self._skip_late(sources[n:])
                break
            if self._one(remote, source):
                read.append(source)
        return read

    def _loads(self, read: list[Source]) -> list[Load]:
        loads = {}
        for source in read:
            assert source.target is not None
            loads[_key(source)] = Load(_key(source), source.name,
                                       copy_in(self.snapshot.repo, source.target))
        for part in self.spool.parts:
            loads[part.source].parts.append(part)
        return list(loads.values())

    def _databases(self, ts: datetime, home: str, dbnames: list[str],
                   deadline: float) -> list[Load]:
        work, result = self.work, self.snapshot.result
        todo = plan(dbnames, work.modules, work.catalogs, work.refresh)
        self.copier = DatabaseCopier(self.snapshot.repo, self.remote, result, ts=ts, home=home,
                                     deadline=deadline, guard=self.guard)
        try:
            return self.copier.read(todo)
        finally:
            result.databases = len(todo)
            result.sessions_opened = self.copier.sessions_opened

    def _skip_late(self, sources: list[Source]) -> None:
        names = ", ".join(s.query_source for s in sources)
        error = (f"Snapshot exceeded its {self.snapshot.budget:.0f}s on the remote server:"
                 f" skipped {names}")
        log.error("%s", error)
        self.snapshot.result.errors.append(error)

    def _one(self, remote: Conn, source: Source) -> bool:
        """Read one source under a savepoint; False (recorded) if it failed."""
        self.snapshot.abort_if_cancelled()
        if source.problem:
            self.snapshot.record_error(source.problem)
            return False
        if source.remote_function is None or source.target is None:
            log.warning("no query_source for %s, skipped", source.function_name)
            return False
        srvid, function = self.snapshot.srvid, source.remote_function
        query = composed(remote, ("copy out", srvid, function), lambda: sql.SQL(
            "COPY (SELECT {}, * FROM {}(0)) TO STDOUT").format(
                sql.Literal(srvid), sql.Identifier(*function)))
        try:
            self.guard.remote_statement()
            self.spool.add(_key(source), None, remote, query, savepoint=True)
        except psycopg.Error as exc:
            if remote.broken:
                raise
            self.snapshot.abort_if_cancelled()
            self.snapshot.record_error(f"Error retrieving datasource data {source.name}:"
                                 f" {one_line(exc)}")
            return False
        return True


class AfterCommit:
    """What a stored snapshot still does on the remote: the sources' ``query_cleanup``."""

    def __init__(self, snapshot: Snapshot, powa: PowaExtension) -> None:
        self.snapshot = snapshot
        self.powa = powa
        self.remote = snapshot.remote
        self.guard = snapshot.guard

    def cleanup(self, copied: list[Source]) -> None:
        """Each stored source's ``query_cleanup`` (e.g. ``pg_qualstats_reset()``), now.

        Only once the snapshot is committed: a cleanup discards the remote's
        data, and must not when that data did not reach the repository.
        """
        errors = [s.cleanup_problem for s in copied if s.cleanup_problem]
        cleanups = [s.cleanup for s in copied if s.cleanup is not None]
        remote = self.remote.conn
        if cleanups and remote is not None:
            errors += self._run(remote, cleanups)
        if errors:
            self._record_late(errors)

    def _run(self, remote: Conn, cleanups: list[sql.Composed]) -> list[str]:
        errors = []
        self.guard.remote_begin(time.monotonic() + self.snapshot.budget)
        try:
            for cleanup in cleanups:
                self.guard.remote_statement()
                try:
                    # SQL text stored by PoWA in powa_functions, run as PoWA means it
                    remote.execute(cleanup)
                except psycopg.Error as exc:
                    text = cleanup.as_string(remote)
                    errors.append(f"Error while calling {text}: {one_line(exc)}")
                    if remote.broken or remote.closed:
                        self.remote.close()
                        break
        finally:
            self.guard.remote_end()
        return errors

    def _record_late(self, errors: list[str]) -> None:
        """Errors found after the commit, appended to the stored ones."""
        snapshot = self.snapshot
        for error in errors:
            log.warning("%s", error)
        snapshot.result.errors += errors
        try:
            record_errors(snapshot.repo, self.powa, snapshot.srvid, errors, replace=False)
            snapshot.repo.commit()
        except psycopg.Error as exc:
            # the snapshot is stored already: this must not report it as failed
            log.warning("server %d: cleanup errors not recorded in the repository: %s",
                        snapshot.srvid, one_line(exc))
            with contextlib.suppress(psycopg.Error):
                snapshot.repo.rollback()
