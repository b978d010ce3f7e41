"""Access to the PoWA repository database: server rows, metadata, versions.

The repository connection is short-lived on purpose: a worker opens it for a
snapshot (or to read its server row) and closes it right after, so that
hundreds of workers never hold hundreds of idle repository sessions.
Every identifier is schema-qualified with the schema the ``powa`` extension
lives in, looked up on each connection and quoted with ``psycopg.sql``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from collector.errors import RepositoryUnavailable, ServerDisabledError, UnknownServerError
from collector.logs import one_line

log = logging.getLogger(__name__)

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
class Server:
    """One row of ``powa_servers``.  Every text column is untrusted."""

    srvid: int
    hostname: str
    port: int
    username: str
    password: str | None = field(repr=False)
    dbname: str
    frequency: int
    alias: str | None = None

    def fingerprint(self) -> str:
        """A digest of the whole row, to notice any change (kept in memory only)."""
        digest = hashlib.sha256()
        for value in (self.hostname, self.port, self.username, self.password, self.dbname,
                      self.frequency, self.alias):
            digest.update(repr(value).encode("utf-8", "backslashreplace") + b"\0")
        return digest.hexdigest()

    def describe(self, use_alias: bool) -> str:
        """How logs name this server; untrusted text is shown with repr()."""
        if use_alias and self.alias:
            return f"server {self.srvid} ({self.alias!r})"
        return f"server {self.srvid} ({self.hostname!r}:{self.port})"


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


def connect(dsn: str, purpose: str, connect_timeout: int = 10) -> Conn:
    """Open a repository connection (not autocommit); RepositoryUnavailable on failure."""
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=False,
            application_name=f"powa-fleet {purpose}"[:63],
            connect_timeout=connect_timeout,
            client_encoding="UTF8",
            **KEEPALIVES,
        )
    except psycopg.Error as exc:
        raise RepositoryUnavailable(f"cannot connect to the repository: {one_line(exc)}") from None
    try:
        set_lock_timeout(conn)
        conn.commit()
    except psycopg.Error as exc:
        conn.close()
        raise RepositoryUnavailable(f"repository session set-up failed: {one_line(exc)}") from None
    return conn


def set_lock_timeout(conn: Conn) -> None:
    """Upstream's lock_timeout for this session, unless one is configured already."""
    conn.execute(
        "SELECT pg_catalog.set_config(name, %s, false) FROM pg_catalog.pg_settings"
        " WHERE name = 'lock_timeout' AND setting = '0'",
        (str(LOCK_TIMEOUT_MS),),
    )


@contextmanager
def session(dsn: str, purpose: str, connect_timeout: int = 10) -> Iterator[Conn]:
    """A repository connection closed on exit, whatever happens."""
    conn = connect(dsn, purpose, connect_timeout)
    try:
        yield conn
    finally:
        conn.close()


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


def require_powa(conn: Conn) -> PowaExtension:
    powa = powa_extension(conn)
    if powa is None:
        raise RepositoryUnavailable("the repository database has no powa extension")
    return powa


_SERVER_COLUMNS = sql.SQL(
    "id, hostname, port, username, password, dbname, frequency, alias"
)


def _server(row: Sequence[object]) -> Server:
    srvid, hostname, port, username, password, dbname, frequency, alias = row
    return Server(
        srvid=int(srvid),  # type: ignore[call-overload]
        hostname=str(hostname),
        port=int(port),  # type: ignore[call-overload]
        username=str(username),
        password=None if password is None else str(password),
        dbname=str(dbname),
        frequency=int(frequency),  # type: ignore[call-overload]
        alias=None if alias is None else str(alias),
    )


def read_server(conn: Conn, powa: PowaExtension, srvid: int) -> Server:
    """The row of one remote server; UnknownServerError or ServerDisabledError if unusable."""
    if srvid <= 0:
        raise UnknownServerError(f"server {srvid} is not a remote server (id 0 is the repository)")
    row = conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
            _SERVER_COLUMNS, powa.name("powa_servers")
        ),
        (srvid,),
    ).fetchone()
    conn.commit()
    if row is None:
        raise UnknownServerError(f"server {srvid} is not in powa_servers")
    server = _server(row)
    if server.frequency <= 0:
        raise ServerDisabledError(f"server {srvid} has frequency {server.frequency}: not collected")
    return server


def list_servers(conn: Conn, powa: PowaExtension) -> list[Server]:
    """Every collected remote server (id > 0, frequency > 0), by id."""
    rows = conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE id > 0 AND frequency > 0 ORDER BY id").format(
            _SERVER_COLUMNS, powa.name("powa_servers")
        )
    ).fetchall()
    conn.commit()
    return [_server(row) for row in rows]


def last_snapshot(conn: Conn, powa: PowaExtension, srvid: int) -> datetime | None:
    """``powa_snapshot_metas.snapts`` of a server, None when never taken."""
    row = conn.execute(
        sql.SQL("SELECT snapts FROM {} WHERE srvid = %s AND snapts > '-infinity'").format(
            powa.name("powa_snapshot_metas")
        ),
        (srvid,),
    ).fetchone()
    conn.commit()
    return row[0] if row else None


def record_errors(
    conn: Conn, powa: PowaExtension, srvid: int, errors: Sequence[str], replace: bool
) -> None:
    """Store errors in ``powa_snapshot_metas.errors`` (powa-web shows them)."""
    metas = powa.name("powa_snapshot_metas")
    if replace:
        query = sql.SQL("UPDATE {} SET errors = %s WHERE srvid = %s").format(metas)
    else:
        query = sql.SQL(
            "UPDATE {} SET errors = pg_catalog.array_cat(errors, %s) WHERE srvid = %s"
        ).format(metas)
    conn.execute(query, (list(errors), srvid))


def save_versions(
    conn: Conn,
    powa: PowaExtension,
    srvid: int,
    *,
    server_version: str,
    extensions: dict[str, str],
    hypopg: str | None,
) -> None:
    """Store the remote's PostgreSQL and extension versions, as upstream does.

    ``powa_servers.version`` gets ``server_version``; each row of
    ``powa_extensions`` of the server gets the remote's ``extversion``; hypopg,
    which need not be installed in the powa database, is tracked from
    ``pg_available_extensions`` (row added, updated or removed).
    """
    conn.execute(
        sql.SQL(
            "UPDATE {} SET version = %s WHERE id = %s AND version IS DISTINCT FROM %s"
        ).format(powa.name("powa_servers")),
        (server_version, srvid, server_version),
    )
    table = powa.name("powa_extensions")
    conn.execute(
        sql.SQL(
            "UPDATE {} e SET version = v.version"
            " FROM unnest(%s::text[], %s::text[]) AS v(extname, version)"
            " WHERE e.srvid = %s AND e.extname = v.extname AND e.extname <> 'hypopg'"
            " AND e.version IS DISTINCT FROM v.version"
        ).format(table),
        (list(extensions), list(extensions.values()), srvid),
    )
    if hypopg is None:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE srvid = %s AND extname = 'hypopg'").format(table),
            (srvid,),
        )
    else:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} AS e (srvid, extname, version) VALUES (%s, 'hypopg', %s)"
                " ON CONFLICT (srvid, extname) DO UPDATE SET version = EXCLUDED.version"
                " WHERE e.version IS DISTINCT FROM EXCLUDED.version"
            ).format(table),
            (srvid, hypopg),
        )


def report_failure(dsn: str, srvid: int, error: str, connect_timeout: int = 10) -> None:
    """Replace a server's stored errors with one line, in a short session of its own."""
    with session(dsn, f"worker {srvid}", connect_timeout) as conn:
        try:
            powa = require_powa(conn)
            record_errors(conn, powa, srvid, [error], replace=True)
            conn.commit()
        except psycopg.Error as exc:
            if conn.broken:
                raise RepositoryUnavailable(one_line(exc)) from None
            # e.g. a lock timeout: a snapshot of the server holds its row right now
            raise
