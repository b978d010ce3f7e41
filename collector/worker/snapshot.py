"""One remote snapshot of one server, stored exactly as PoWA 4.1 expects.

For each enabled source of ``powa_functions`` (operation ``snapshot``), the
rows of ``<schema>.<query_source>(0)`` on the remote are streamed, prefixed
with the server id, straight into ``<schema>.<query_source>_tmp`` on the
repository: COPY out to COPY in, block by block, so a worker's memory does
not grow with the number of statements.  Then ``powa_take_snapshot(N)``
turns those rows into history.

Every repository write of the snapshot happens in one transaction:

* it starts by locking the server's ``powa_snapshot_metas`` row (NOWAIT), so
  two snapshots of one server can never overlap, whichever process runs them;
* each source copies under a savepoint: a failing source is rolled back (no
  half-copied rows stay) and recorded, and the others continue;
* if ``powa_take_snapshot`` itself fails, everything copied is rolled back and
  only the error is stored (upstream commits the ``_tmp`` rows in that case,
  and the next snapshot stores them again);
* the server's ``_tmp`` rows left by a snapshot function that failed inside
  ``powa_take_snapshot`` are removed before commit;
* the errors of the run are appended to ``powa_snapshot_metas.errors`` after
  ``powa_take_snapshot`` (which clears that column first).

On the remote, the sources run in one transaction committed before the
repository work, and ``query_cleanup`` (e.g. ``pg_qualstats_reset()``) runs
only once the snapshot is committed, for the sources that were stored
(upstream runs it right after each source, even a failed one: data that
never reached the repository is thrown away).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from collector.errors import ConcurrentSnapshotError, RemoteUnavailable, SnapshotAborted
from collector.logs import one_line
from collector.pg import Conn, PowaExtension
from collector.repository import record_errors, require_powa, save_versions
from collector.worker.remote import RemoteSession

log = logging.getLogger(__name__)

#: bytes of COPY data held between the remote and the repository
CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class Source:
    """One enabled ``snapshot`` row of ``powa_functions``."""

    module: str
    query_source: str
    query_cleanup: str | None
    function_name: str


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

    @property
    def outcome(self) -> str:
        if self.failed or not self.committed:
            return "failed"
        return "errors" if self.errors or self.take_snapshot_errors else "ok"

    @property
    def error_count(self) -> int:
        return len(self.errors) + self.take_snapshot_errors


def _sources(repo: Conn, powa: PowaExtension, srvid: int) -> list[Source]:
    rows = repo.execute(
        sql.SQL(
            "SELECT module, query_source, query_cleanup, function_name FROM {}"
            " WHERE srvid = %s AND operation = 'snapshot' AND enabled"
            " ORDER BY priority, module"
        ).format(powa.name("powa_functions")),
        (srvid,),
    ).fetchall()
    return [Source(str(m), str(q) if q else "", c, str(f)) for m, q, c, f in rows]


def _lock_server(repo: Conn, powa: PowaExtension, srvid: int) -> None:
    """Lock the server's metas row for the whole transaction: one snapshot at a time."""
    try:
        row = repo.execute(
            sql.SQL("SELECT 1 FROM {} WHERE srvid = %s FOR UPDATE NOWAIT").format(
                powa.name("powa_snapshot_metas")
            ),
            (srvid,),
        ).fetchone()
    except psycopg.errors.LockNotAvailable:
        repo.rollback()
        raise ConcurrentSnapshotError(
            f"another snapshot of server {srvid} is running (its powa_snapshot_metas row is locked)"
        ) from None
    if row is None:
        repo.rollback()
        raise SnapshotAborted(f"server {srvid} has no powa_snapshot_metas row: not registered?")


def _clear_tmp(repo: Conn, powa: PowaExtension, srvid: int, sources: list[Source]) -> None:
    tables = {s.query_source for s in sources if s.query_source}
    if not tables:
        return
    statements = sql.SQL("; ").join(
        sql.SQL("DELETE FROM {} WHERE srvid = {}").format(
            powa.name(table + "_tmp"), sql.Literal(srvid)
        )
        for table in sorted(tables)
    )
    repo.execute(statements)


class Guard:
    """What watches a snapshot's remote statements (the worker's watchdog); inert here.

    ``remote_begin(deadline)`` opens a phase of remote statements that must end
    by ``deadline`` (monotonic), ``remote_statement()`` tells one starts,
    ``remote_end()`` closes the phase; ``cancelled()`` says the queries were
    cancelled on purpose (the worker stops): the snapshot is then rolled back
    whole instead of recorded.
    """

    def remote_begin(self, deadline: float) -> None:
        return None

    def remote_statement(self) -> None:
        return None

    def remote_end(self) -> None:
        return None

    def cancelled(self) -> bool:
        return False


class Snapshot:
    """Takes one snapshot; ``run()`` returns a SnapshotResult or raises.

    The remote part (the sources, then their cleanups) must end within
    ``budget`` seconds: past it, no new source is started.  ``clear_stale``
    first deletes the server's rows left in the ``_tmp`` tables by someone
    else (a worker does it once, at its first snapshot: the deletes scan tables
    full of dead rows, not worth paying every time).
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
    ) -> None:
        self.repo = repo
        self.remote = remote
        self.srvid = srvid
        self.budget = budget
        self.guard = guard or Guard()
        self.clear_stale = clear_stale
        self.result = SnapshotResult(srvid=srvid, started_at=time.time())

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.result.timings[name] = self.result.timings.get(name, 0.0) + now - since
        return now

    def run(self) -> SnapshotResult:
        """Take the snapshot in one repository transaction, committed at the end."""
        started = time.perf_counter()
        repo, srvid = self.repo, self.srvid
        powa = require_powa(repo)
        _lock_server(repo, powa, srvid)
        sources = _sources(repo, powa, srvid)
        mark = self._phase("prepare", started)
        copied: list[Source] = []
        versions_saved = False
        if self._compatible(powa):
            if not sources:
                log.info("no snapshot source enabled for server %d", srvid)
            if self.clear_stale:
                _clear_tmp(repo, powa, srvid, sources)
            with repo.transaction() as data:
                copied = self._copy_sources(powa, sources)
                mark = self._phase("sources", mark)
                self._take(powa, data)
                mark = self._phase("powa_take_snapshot", mark)
            if self.result.take_snapshot_errors:
                # a snapshot function failed inside powa_take_snapshot: its rows are left
                _clear_tmp(repo, powa, srvid, sources)
            if self.result.errors:
                # after a failed powa_take_snapshot the old errors are still there
                record_errors(repo, powa, srvid, self.result.errors, replace=self.result.failed)
            versions_saved = self._save_versions(powa)
        repo.commit()
        if versions_saved:
            self.remote.versions_pending = False
        self.result.committed = True
        if not self.result.failed:
            self._cleanup(powa, copied)
        self._phase("commit", mark)
        self.result.duration = time.perf_counter() - started
        return self.result

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

    def _compatible(self, powa: PowaExtension) -> bool:
        """Same PoWA major.minor on both sides, else record why and copy nothing."""
        remote_powa = self.remote.powa
        if remote_powa is None:
            error = f"PoWA extension not found on remote server {self.srvid}"
        elif remote_powa.major_minor != powa.major_minor:
            error = (
                "Incompatible PoWA version between the repository server "
                f"({'.'.join(powa.major_minor)}.X) and the remote host "
                f"({'.'.join(remote_powa.major_minor)}.X)"
            )
        else:
            return True
        self.result.errors.append(error)
        self.result.failed = True
        record_errors(self.repo, powa, self.srvid, [error], replace=True)
        log.error("%s", error)
        return False

    def _copy_sources(self, powa: PowaExtension, sources: list[Source]) -> list[Source]:
        """Stream every source in one remote transaction; the sources stored."""
        remote = self.remote.conn
        if remote is None:
            raise RemoteUnavailable("no connection to remote server")
        assert self.remote.powa is not None
        remote_powa = self.remote.powa
        deadline = time.monotonic() + self.budget
        copied = []
        self.guard.remote_begin(deadline)
        try:
            with remote.transaction():
                self.guard.remote_statement()
                remote.execute(
                    sql.SQL("SET LOCAL statement_timeout = {}").format(
                        sql.Literal(int(self.budget * 1000))
                    )
                )
                for n, source in enumerate(sources):
                    if time.monotonic() >= deadline:
                        self._skip_late(sources[n:])
                        break
                    if self._copy_one(powa, remote_powa, source):
                        copied.append(source)
        except psycopg.OperationalError as exc:
            if remote.closed or remote.broken:
                self.remote.close()
                raise RemoteUnavailable(one_line(exc)) from None
            raise
        finally:
            self.guard.remote_end()
        return copied

    def _skip_late(self, sources: list[Source]) -> None:
        names = ", ".join(s.query_source for s in sources)
        error = f"Snapshot exceeded its {self.budget:.0f}s on the remote server: skipped {names}"
        log.error("%s", error)
        self.result.errors.append(error)

    def _abort_if_cancelled(self) -> None:
        if self.guard.cancelled():
            raise SnapshotAborted("snapshot cancelled: nothing of it is stored")

    def _copy_one(self, powa: PowaExtension, remote_powa: PowaExtension, source: Source) -> bool:
        """Copy one source under savepoints on both sides; False (recorded) if it failed."""
        self._abort_if_cancelled()
        if not source.query_source:
            log.warning("no query_source for %s, skipped", source.function_name)
            return False
        remote = self.remote.conn
        assert remote is not None
        query = sql.SQL("COPY (SELECT {}, * FROM {}(0)) TO STDOUT").format(
            sql.Literal(self.srvid), remote_powa.name(source.query_source)
        )
        target = sql.SQL("COPY {} FROM STDIN").format(powa.name(source.query_source + "_tmp"))
        try:
            with self.repo.transaction(), remote.transaction():
                self.guard.remote_statement()
                rows = self._stream(query, target)
        except psycopg.Error as exc:
            if remote.broken or self.repo.broken:
                raise
            self._abort_if_cancelled()
            error = f"Error retrieving datasource data {source.module}: {one_line(exc)}"
            log.warning("%s", error)
            self.result.errors.append(error)
            return False
        self.result.rows[source.module] = self.result.rows.get(source.module, 0) + rows
        return True

    def _stream(self, query: sql.Composed, target: sql.Composed) -> int:
        remote = self.remote.conn
        assert remote is not None
        with self.repo.cursor() as into, remote.cursor() as out:
            with into.copy(target) as copy_in, out.copy(query) as copy_out:
                # rows arrive one by one; hand them over in chunks (fewer libpq calls),
                # so memory holds one chunk at most, whatever the number of rows
                chunk = bytearray()
                for row in copy_out:
                    chunk += row
                    if len(chunk) >= CHUNK_SIZE:
                        copy_in.write(chunk)
                        chunk = bytearray()
                if chunk:
                    copy_in.write(chunk)
            return into.rowcount

    def _take(self, powa: PowaExtension, data: psycopg.Transaction) -> None:
        """powa_take_snapshot(N); if it fails, roll back every copied row, keep the error."""
        try:
            with self.repo.transaction():
                row = self.repo.execute(
                    sql.SQL("SELECT {}(%s)").format(powa.name("powa_take_snapshot")),
                    (self.srvid,),
                ).fetchone()
        except psycopg.Error as exc:
            if self.repo.broken:
                raise
            self._abort_if_cancelled()
            error = f"Error while taking snapshot for server {self.srvid}: {one_line(exc)}"
            log.error("%s", error)
            self.result.errors.append(error)
            self.result.failed = True
            raise psycopg.Rollback(data) from None
        self.result.take_snapshot_errors = int(row[0]) if row and row[0] is not None else 0

    def _cleanup(self, powa: PowaExtension, copied: list[Source]) -> None:
        """Each stored source's ``query_cleanup`` (e.g. ``pg_qualstats_reset()``), now.

        Only once the snapshot is committed: a cleanup discards the remote's
        data, and must not when that data did not reach the repository.
        """
        cleanups = [s.query_cleanup for s in copied if s.query_cleanup]
        remote = self.remote.conn
        if not cleanups or remote is None:
            return
        errors = []
        self.guard.remote_begin(time.monotonic() + self.budget)
        try:
            for cleanup in cleanups:
                self.guard.remote_statement()
                try:
                    # SQL text stored by PoWA in powa_functions, run as-is by design
                    remote.execute(cleanup)
                except psycopg.Error as exc:
                    errors.append(f"Error while calling {cleanup}: {one_line(exc)}")
                    if remote.broken or remote.closed:
                        self.remote.close()
                        break
        finally:
            self.guard.remote_end()
        if errors:
            for error in errors:
                log.warning("%s", error)
            self.result.errors += errors
            try:
                record_errors(self.repo, powa, self.srvid, errors, replace=False)
                self.repo.commit()
            except psycopg.Error as exc:
                # the snapshot is stored already: this must not report it as failed
                log.warning("server %d: cleanup errors not recorded in the repository: %s",
                            self.srvid, one_line(exc))
                with contextlib.suppress(psycopg.Error):
                    self.repo.rollback()
