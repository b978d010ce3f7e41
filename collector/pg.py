"""PostgreSQL plumbing both sides of a fleet use: sessions' settings, cancelling, PoWA's place.

Nothing here knows the repository's tables or the remote's sources; the
worker's remote session, its watchdog and the repository access build on it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

Conn = psycopg.Connection[TupleRow]

#: upstream powa-collector sets the same lock_timeout when none is configured
LOCK_TIMEOUT_MS = 2000
#: a peer gone from the network is noticed within about a minute, even by a
#: connection waiting for an answer (keepalives) or with data unacknowledged
#: (tcp_user_timeout, in ms)
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}


@dataclass(frozen=True)
class PowaExtension:
    """Where and which version of the ``powa`` extension one database has."""

    schema: str
    version: str

    @property
    def major_minor(self) -> tuple[str, str]:
        parts = [*self.version.split("."), "0"][:2]
        return parts[0], parts[1]

    def name(self, *parts: str) -> sql.Identifier:
        return sql.Identifier(self.schema, *parts)


def set_lock_timeout(conn: Conn) -> None:
    """Upstream's lock_timeout for this session, unless one is configured already."""
    conn.execute(
        "SELECT pg_catalog.set_config(name, %s, false) FROM pg_catalog.pg_settings"
        " WHERE name = 'lock_timeout' AND setting = '0'",
        (str(LOCK_TIMEOUT_MS),),
    )


def cancel(conn: Conn) -> None:
    """Cancel the statement a connection runs (from another thread)."""
    if not conn.closed:
        with contextlib.suppress(Exception):
            conn.cancel_safe(timeout=2.0)


def abort(conn: Conn) -> None:
    """Shut a connection's socket down (from another thread): a statement blocked on a
    server that does not answer, not even to a cancel, fails at once."""
    if conn.closed:
        return
    with contextlib.suppress(OSError, psycopg.Error):
        # a duplicate of the descriptor: shutting it down ends the connection for both
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def powa_extension(conn: Conn) -> PowaExtension | None:
    row = conn.execute(
        "SELECT n.nspname, e.extversion FROM pg_catalog.pg_extension e"
        " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'powa'"
    ).fetchone()
    return PowaExtension(str(row[0]), str(row[1])) if row else None


