"""Access to the PoWA repository database: server rows, metadata, versions.

The repository connection is short-lived on purpose: a worker opens it for a
snapshot (or to read its server row) and closes it right after, so that
hundreds of workers never hold hundreds of idle repository sessions.
Every identifier is schema-qualified with the schema the ``powa`` extension
lives in, looked up on each connection and quoted with ``psycopg.sql``; on
PoWA 5 the sessions' ``search_path`` is ``pg_catalog`` (as upstream's), so
nothing is ever resolved through it.  The PoWA-version-specific tables are
chosen here (``powa_extensions`` on 4.1, ``powa_extension_config`` on 5).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from collector import __version__, pg
from collector.errors import RepositoryUnavailable, ServerDisabledError, UnknownServerError
from collector.logs import one_line
from collector.pg import KEEPALIVES, Conn, PowaExtension, lock_limits, powa_extension

log = logging.getLogger(__name__)

#: the control's session: powa-web looks for this prefix (upstream's main thread name)
CONTROL_SESSION_PREFIX = "PoWA collector - main thread ("
CONTROL_SESSION = f"{CONTROL_SESSION_PREFIX}powa-fleet {__version__})"

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
        """How logs name this server; untrusted text is escaped (no forged log lines)."""
        if use_alias and self.alias:
            return f"server {self.srvid} ({self.alias!r})"
        # repr() escapes control characters; its quotes would land around the host only
        return f"server {self.srvid} ({repr(self.hostname)[1:-1]}:{self.port})"


_SECURE_SEARCH_PATH = sql.SQL(
    "SELECT pg_catalog.set_config('search_path', 'pg_catalog', false)"
    " FROM pg_catalog.pg_extension"
    " WHERE extname = 'powa' AND pg_catalog.substring(extversion, '^[0-9]+')::int >= 5"
)


def session_name(purpose: str) -> str:
    """``application_name`` of a repository session; the control's is upstream's.

    powa-web (4.1 and 5.x) tells whether a collector runs by looking for a
    session named like ``PoWA collector - main thread (%`` in the repository's
    ``pg_stat_activity``; the others say which program, and which server, they serve.
    """
    if purpose == "control":
        return CONTROL_SESSION
    return f"powa-fleet {purpose}"[:63]


def connect(dsn: str, purpose: str, connect_timeout: int = 10, *,
            statement_timeout: float | None = None) -> Conn:
    """Open a repository connection (not autocommit); RepositoryUnavailable on failure.

    Its settings (lock limits, search path, and ``statement_timeout`` seconds
    if given) are sent in one round trip, outside any transaction: a worker
    opens a session per snapshot, and each round trip costs it CPU.
    """
    try:
        conn = psycopg.connect(
            dsn,
            hostaddr=pg.resolve_dsn(dsn, connect_timeout),
            autocommit=True,
            application_name=session_name(purpose),
            connect_timeout=connect_timeout,
            client_encoding="UTF8",
            **KEEPALIVES,
        )
    except psycopg.Error as exc:
        raise RepositoryUnavailable(f"cannot connect to the repository: {one_line(exc)}") from None
    setup = [lock_limits(), _SECURE_SEARCH_PATH]
    if statement_timeout is not None:
        setup.append(pg.statement_timeout(statement_timeout))
    try:
        # no parameters: the statements go together, in one simple query
        conn.execute(sql.SQL("; ").join(setup))
        conn.autocommit = False
    except psycopg.Error as exc:
        conn.close()
        raise RepositoryUnavailable(f"repository session set-up failed: {one_line(exc)}") from None
    return conn


@contextmanager
def session(dsn: str, purpose: str, connect_timeout: int = 10, *,
            statement_timeout: float | None = None) -> Iterator[Conn]:
    """A repository connection closed on exit, whatever happens."""
    conn = connect(dsn, purpose, connect_timeout, statement_timeout=statement_timeout)
    try:
        yield conn
    finally:
        conn.close()


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


def load_server(dsn: str, srvid: int, connect_timeout: int) -> tuple[Server, datetime | None]:
    """A worker's server row and last snapshot time, in a short session of its own.

    RepositoryUnavailable when the repository cannot tell; UnknownServerError
    or ServerDisabledError when the server cannot be collected.
    """
    with session(dsn, f"worker {srvid}", connect_timeout) as conn:
        try:
            powa = require_powa(conn)
            return read_server(conn, powa, srvid), last_snapshot(conn, powa, srvid)
        except psycopg.Error as exc:
            raise RepositoryUnavailable(one_line(exc)) from None


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

    ``powa_servers.version`` gets ``server_version``; each row of the server
    in ``powa_extensions`` (PoWA 4.1) or ``powa_extension_config`` (PoWA 5)
    gets the remote's ``extversion``; hypopg, which need not be installed in
    the powa database, is tracked from ``pg_available_extensions`` (row
    added, updated or removed).
    """
    conn.execute(
        sql.SQL(
            "UPDATE {} SET version = %s WHERE id = %s AND version IS DISTINCT FROM %s"
        ).format(powa.name("powa_servers")),
        (server_version, srvid, server_version),
    )
    table = powa.name(_extensions_table(powa))
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


def _extensions_table(powa: PowaExtension) -> str:
    return "powa_extension_config" if powa.major >= 5 else "powa_extensions"


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
