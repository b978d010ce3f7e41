"""COPY out of a remote, into the repository or a spool, and what watches the remote meanwhile.

psycopg's ``Copy`` hands out one row per ``wait()`` on the connection, about
a microsecond of Python per row: a first snapshot of a hundred databases
reads a million catalog rows.  ``copy_out`` drains a whole ``COPY TO`` in a
single ``wait()`` of one generator, which only yields to wait for the socket
when libpq has no row buffered, and hands the rows on in blocks, as bytes,
verbatim: the remote's COPY text is what the repository's COPY reads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import errors, pq, sql
from psycopg.abc import PQGen
from psycopg.generators import fetch_many
from psycopg.waiting import Wait

from collector.errors import SnapshotAborted
from collector.pg import Conn

#: a COPY statement, composed or already as bytes (reused for many databases)
Statement = sql.Composed | bytes

#: bytes of COPY data handed over at once
CHUNK_SIZE = 64 * 1024

#: bytes a spool keeps in memory before it moves to a temporary file
SPOOL_MEMORY = 1024 * 1024

Write = Callable[[bytes], object]


class Guard:
    """What watches a snapshot's remote statements (the worker's watchdog); inert here.

    ``remote_begin(deadline)`` opens a phase of remote statements that must end
    by ``deadline`` (monotonic), ``remote_statement()`` tells one starts,
    ``remote_end()`` closes the phase; ``cancelled()`` says the queries were
    cancelled on purpose (the worker stops): the snapshot is then rolled back
    whole instead of recorded.  Per-database reads call it from two threads.
    """

    def remote_begin(self, deadline: float) -> None:
        return None

    def remote_statement(self) -> None:
        return None

    def remote_end(self) -> None:
        return None

    def cancelled(self) -> bool:
        return False


# ---------------------------------------------------------------- COPY TO
def copy_out(conn: Conn, query: Statement, write: Write, *, savepoint: bool = False) -> int:
    """Run ``COPY ... TO STDOUT`` on ``conn``, its rows to ``write`` in blocks; the row count.

    psycopg.Error as ``execute()`` raises it.  If ``write`` fails, the rest
    of the COPY is read and dropped (the session stays usable), then its
    exception is raised.  ``savepoint``: SAVEPOINT first, in the same round
    trip (roll back to it with ROLLBACK_TO on failure).
    """
    data = query if isinstance(query, bytes) else query.as_bytes(conn)
    if savepoint:
        data = SAVEPOINT + b"; " + data
    encoding = conn.info.encoding
    with conn.lock:
        return conn.wait(_copy_out(conn.pgconn, data, _Blocks(write), encoding))


class _Blocks:
    """Rows gathered into blocks for ``write``; after a failed write, the rest is dropped."""

    def __init__(self, write: Write) -> None:
        self.write = write
        self.block = bytearray()
        self.failure: Exception | None = None

    def flush(self) -> None:
        if self.block and self.failure is None:
            try:
                self.write(bytes(self.block))
            except Exception as exc:
                self.failure = exc
        self.block.clear()


def _copy_out(pgconn: pq.abc.PGconn, query: bytes, out: _Blocks, encoding: str) -> PQGen[int]:
    pgconn.send_query(query)
    results = yield from fetch_many(pgconn)
    # a SAVEPOINT sent with it comes first
    for result in results[:-1]:
        _check([result], pq.ExecStatus.COMMAND_OK, encoding)
    _check(results, pq.ExecStatus.COPY_OUT, encoding)
    yield from _rows(pgconn, out)
    done = _check((yield from fetch_many(pgconn)), pq.ExecStatus.COMMAND_OK, encoding)
    if out.failure is not None:
        raise out.failure
    return done.command_tuples or 0


def _rows(pgconn: pq.abc.PGconn, out: _Blocks) -> PQGen[None]:
    """The rows of a COPY TO, until its end (libpq's COPY data: one row per message)."""
    block = out.block
    while True:
        size, row = pgconn.get_copy_data(1)
        if size > 0:
            block += row
            if len(block) >= CHUNK_SIZE:
                out.flush()
        elif size == 0:
            # nothing buffered: wait for the socket (the watchdog may cancel meanwhile)
            while not (yield Wait.R):
                continue
            pgconn.consume_input()
        else:
            break
    out.flush()


def _check(results: list[pq.abc.PGresult], status: pq.ExecStatus,
           encoding: str) -> pq.abc.PGresult:
    if not results:
        raise psycopg.OperationalError("no result from the server")
    result = results[-1]
    if result.status != status:
        raise errors.error_from_result(result, encoding=encoding)
    return result


def command(conn: Conn, query: bytes) -> None:
    """Run statements that return no rows (a savepoint's), without a cursor.

    psycopg's ``execute()`` costs some 50 µs of Python per statement; a
    snapshot runs a few per source, on each side.
    """
    encoding = conn.info.encoding
    with conn.lock:
        conn.wait(_command(conn.pgconn, query, encoding))


def _command(pgconn: pq.abc.PGconn, query: bytes, encoding: str) -> PQGen[None]:
    pgconn.send_query(query)
    results = yield from fetch_many(pgconn)
    for result in results:
        _check([result], pq.ExecStatus.COMMAND_OK, encoding)


#: each source read in a remote transaction has a savepoint of its own, taken in the
#: same round trip as its COPY and never released (the commit ends them all):
#: one round trip per source instead of three
SAVEPOINT = b"SAVEPOINT powa_fleet_source"
ROLLBACK_TO = b"ROLLBACK TO SAVEPOINT powa_fleet_source"


# ---------------------------------------------------------------- spools
class Spool:
    """Rows read from the remote, bound for the repository; each source's and database's
    rows are a ``Part`` of it.

    In memory up to SPOOL_MEMORY, in a temporary file beyond: a worker's
    memory does not grow with the number of databases or rows.
    """

    def __init__(self) -> None:
        # closed by close(): a spool lives for the snapshot
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        self.parts: list[Part] = []

    def add(self, source: str, dbname: str | None, conn: Conn, query: Statement, *,
            savepoint: bool = False) -> int:
        """COPY ``query`` out of ``conn`` into the spool; the row count (none kept on error).

        ``savepoint``: inside the caller's transaction, under a savepoint of
        its own; a psycopg.Error rolls back to it (the transaction goes on).
        """
        mark = self.mark()
        try:
            rows = copy_out(conn, query, self._file.write, savepoint=savepoint)
        except psycopg.Error:
            self.rollback(mark)
            if savepoint and not (conn.closed or conn.broken):
                command(conn, ROLLBACK_TO)
            raise
        except BaseException:
            self.rollback(mark)
            raise
        if rows:
            self.parts.append(Part(self, source, dbname, mark[0], self._file.tell(), rows))
        return rows

    def mark(self) -> tuple[int, int]:
        return self._file.tell(), len(self.parts)

    def rollback(self, mark: tuple[int, int]) -> None:
        """Forget what was added since ``mark``."""
        self._file.seek(mark[0])
        self._file.truncate()
        del self.parts[mark[1]:]

    def blocks(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes from ``start`` to ``end`` (the file's end is kept for later adds)."""
        self._file.seek(start)
        try:
            while start < end:
                block = self._file.read(min(CHUNK_SIZE, end - start))
                if not block:
                    break
                start += len(block)
                yield block
        finally:
            self._file.seek(0, 2)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Part:
    """The rows a source gave in one database (None: a global source), in a spool."""

    spool: Spool
    #: the key of the source's Load
    source: str
    dbname: str | None
    start: int
    end: int
    rows: int

    def blocks(self) -> Iterator[bytes]:
        return self.spool.blocks(self.start, self.end)


# ---------------------------------------------------------------- into the repository
@dataclass
class Load:
    """A source's rows (of one or many databases) bound for its ``_tmp`` table."""

    #: what its parts are filed under (its table: a name may have several sources)
    key: str
    #: the source's name, for errors
    source: str
    #: ``COPY <table> FROM STDIN``
    target: bytes
    parts: list[Part] = field(default_factory=list)


#: told of a part (or a whole load: dbname None) the repository refused
Refused = Callable[[str, str | None, psycopg.Error], None]


def store(repo: Conn, loads: Sequence[Load], guard: Guard, refused: Refused) -> dict[str, int]:
    """Every load into the repository; the rows stored per key (the refused ones missing).

    One savepoint and one COPY per load for all; should the repository refuse
    one, each load again under a savepoint of its own, and the parts of a
    refused load each on their own: only what fails is lost (and told).
    """
    try:
        with repo.transaction():
            return {load.key: _copy_in(repo, load.target, load.parts) for load in loads}
    except psycopg.Error as exc:
        _give_up_if(repo, guard, exc)
    stored: dict[str, int] = {}
    for load in loads:
        rows = _store_alone(repo, load, guard, refused)
        if rows is not None:
            stored[load.key] = rows
    return stored


def _give_up_if(repo: Conn, guard: Guard, exc: psycopg.Error) -> None:
    """Past a failed COPY: nothing more to try on a broken session or a cancelled snapshot."""
    if repo.broken:
        raise exc
    if guard.cancelled():
        raise SnapshotAborted("snapshot cancelled: nothing of it is stored")


def _store_alone(repo: Conn, load: Load, guard: Guard, refused: Refused) -> int | None:
    try:
        with repo.transaction():
            return _copy_in(repo, load.target, load.parts)
    except psycopg.Error as exc:
        _give_up_if(repo, guard, exc)
        if len({part.dbname for part in load.parts}) < 2:
            refused(load.source, load.parts[0].dbname if load.parts else None, exc)
            return None
    rows = 0
    for part in load.parts:
        try:
            with repo.transaction():
                rows += _copy_in(repo, load.target, [part])
        except psycopg.Error as exc:
            _give_up_if(repo, guard, exc)
            refused(load.source, part.dbname, exc)
    return rows


def _copy_in(repo: Conn, target: bytes, parts: Sequence[Part]) -> int:
    """``COPY target FROM STDIN`` of the parts' rows; their number."""
    if not parts:
        return 0
    with repo.cursor() as into:
        with into.copy(target) as copy:
            for part in parts:
                for block in part.blocks():
                    copy.write(block)
        return into.rowcount
