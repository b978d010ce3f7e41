"""COPY from a remote straight into the repository, and what watches the remote meanwhile."""

from __future__ import annotations

from psycopg import sql

from collector.pg import Conn

#: a COPY statement, composed or already as bytes (reused for many databases)
Statement = sql.Composed | bytes

#: bytes of COPY data held between the remote and the repository
CHUNK_SIZE = 64 * 1024


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


def stream(remote: Conn, query: Statement, repo: Conn, target: Statement) -> int:
    """COPY ``query`` out of the remote into ``target``; the number of rows stored."""
    with repo.cursor() as into, remote.cursor() as out:
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
