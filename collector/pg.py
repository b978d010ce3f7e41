"""PostgreSQL plumbing both sides of a fleet use: sessions' settings, cancelling, PoWA's place.

Nothing here knows the repository's tables or the remote's sources; the
worker's remote session, its watchdog and the repository access build on it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

Conn = psycopg.Connection[TupleRow]

#: upstream powa-collector sets the same lock_timeout when none is configured
LOCK_TIMEOUT_MS = 2000
#: a session idle inside a transaction this long is ended by the server
IDLE_IN_TRANSACTION_MS = 60_000
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
    def major(self) -> int:
        """The major version as a number (0 if the version has none): 4 or 5."""
        head = self.major_minor[0]
        return int(head) if head.isdigit() else 0

    @property
    def major_minor(self) -> tuple[str, str]:
        parts = [*self.version.split("."), "0"][:2]
        return parts[0], parts[1]

    def name(self, *parts: str) -> sql.Identifier:
        return sql.Identifier(self.schema, *parts)


def lock_limits() -> sql.Composed:
    """The session's server-side limits, each unless one is configured already.

    Upstream's ``lock_timeout``; and ``idle_in_transaction_session_timeout``:
    a process that can no longer drive its transaction (frozen, swapped out,
    cut off) has it rolled back by the server, its locks released, within
    ``IDLE_IN_TRANSACTION_MS`` (the snapshot it was taking is lost whole).
    Literal values: it may be sent with other statements in one round trip.
    """
    return sql.SQL(
        "SELECT pg_catalog.set_config(s.name, v.setting, false) FROM pg_catalog.pg_settings s"
        " JOIN (VALUES ('lock_timeout', {}), ('idle_in_transaction_session_timeout', {}))"
        " AS v(name, setting) ON v.name = s.name WHERE s.setting = '0'"
    ).format(sql.Literal(str(LOCK_TIMEOUT_MS)), sql.Literal(str(IDLE_IN_TRANSACTION_MS)))


def set_lock_timeout(conn: Conn) -> None:
    """``lock_limits()`` on this session."""
    conn.execute(lock_limits())


def statement_timeout(seconds: float) -> sql.Composed:
    """A server-side bound on every statement of the session (0: none)."""
    return sql.SQL("SELECT pg_catalog.set_config('statement_timeout', {}, false)").format(
        sql.Literal(str(int(seconds * 1000))))


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


#: statements composed by composed(), by key and client encoding
_COMPOSED: dict[tuple[Hashable, str], bytes] = {}
#: more keys than a worker ever sends (its server's sources): a bug, not a cache
_COMPOSED_MAX = 512


def composed(conn: Conn, key: Hashable, compose: Callable[[], sql.Composable]) -> bytes:
    """``compose()`` as the bytes sent on ``conn``, composed once per key and encoding.

    A snapshot sends the same few dozen statements every time, and psycopg.sql
    takes about 12 µs of CPU to compose one, more than the rest of its round
    trip.  ``key`` names everything the statement is made of (its kind, the
    schema, the server id...): two statements must never share one.
    """
    full = (key, conn.info.encoding)
    text = _COMPOSED.get(full)
    if text is None:
        if len(_COMPOSED) >= _COMPOSED_MAX:
            _COMPOSED.clear()
        text = _COMPOSED[full] = compose().as_bytes(conn)
    return text


def powa_extension(conn: Conn) -> PowaExtension | None:
    row = conn.execute(
        "SELECT n.nspname, e.extversion FROM pg_catalog.pg_extension e"
        " JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'powa'"
    ).fetchone()
    return PowaExtension(str(row[0]), str(row[1])) if row else None




#: host name lookups that may hang at once (each in a thread of its own)
_LOOKUPS = threading.BoundedSemaphore(4)


def resolve(host: str | None, timeout: float) -> str | None:
    """The address libpq should connect to for ``host``, found within ``timeout`` seconds.

    libpq resolves names with the blocking ``getaddrinfo``, which ignores
    ``connect_timeout``: a DNS server that never answers would hold a worker
    (deaf to SIGTERM) for minutes.  The name is resolved here, in a thread
    waited for at most ``timeout``, and handed to libpq as ``hostaddr``
    (``host`` is kept for TLS and ``.pgpass``).  None when there is nothing
    to resolve (an address, a socket directory, a list of hosts).
    """
    if not host or host.startswith("/") or "," in host or _is_address(host):
        return None
    if not _LOOKUPS.acquire(blocking=False):
        raise psycopg.OperationalError(
            f"could not resolve host name {host!r}: earlier lookups still hang")
    found: list[str] = []
    failed: list[OSError] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.extend(str(info[4][0]) for info in
                         socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)
        finally:
            _LOOKUPS.release()
            done.set()

    threading.Thread(target=lookup, name="resolve", daemon=True).start()
    if not done.wait(timeout):
        raise psycopg.OperationalError(
            f"could not resolve host name {host!r} within {timeout:g}s (DNS does not answer)")
    if failed or not found:
        raise psycopg.OperationalError(
            f"could not translate host name {host!r} to an address: "
            f"{failed[0] if failed else 'no address'}")
    return found[0]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def resolve_dsn(dsn: str, timeout: float) -> str | None:
    """``hostaddr`` for a DSN whose one host is a name (see ``resolve``), else None."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return None
    host = params.get("host")
    if "hostaddr" in params or not isinstance(host, str):
        return None
    return resolve(host, timeout)
