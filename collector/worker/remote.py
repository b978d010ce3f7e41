"""The persistent connection of a worker to its remote server.

It stays open between snapshots, in autocommit mode so that it is never idle
in a transaction: each snapshot wraps its source queries in one explicit
transaction (every source sees the same ``now()``, as with upstream) and
commits it before the repository work starts.  TCP keepalives and
``tcp_user_timeout`` bound how long a dead network can hold it; statement
deadlines are set per snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time

import psycopg

from collector import pg
from collector.errors import RemoteUnavailable
from collector.logs import REDACTOR, one_line
from collector.pg import KEEPALIVES, Conn, PowaExtension, powa_extension, set_lock_timeout
from collector.repository import Server

log = logging.getLogger(__name__)

_REMOTE_INFO = """
SELECT pg_catalog.current_setting('server_version'),
       pg_catalog.current_setting('server_version_num')::int,
       (SELECT pg_catalog.json_object_agg(e.extname,
                   pg_catalog.json_build_array(e.extversion, n.nspname))
        FROM pg_catalog.pg_extension e
        JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace),
       (SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = 'hypopg'),
       pg_catalog.current_setting('lock_timeout')
"""
#: PoWA 5 sessions resolve nothing through the search_path (upstream does the same)
_SECURE_SEARCH_PATH = "SELECT pg_catalog.set_config('search_path', 'pg_catalog', false)"


def _option(value: str) -> str:
    """A setting's value as libpq's ``options`` needs it (spaces and backslashes escaped)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


class RemoteSession:
    """Connection to one remote server, with what a snapshot needs to know about it."""

    def __init__(self, server: Server, connect_timeout: int = 5) -> None:
        self.server = server
        self.connect_timeout = connect_timeout
        self.versions_read_at = 0.0
        self.conn: Conn | None = None
        self.powa: PowaExtension | None = None
        self.server_version = ""
        self.server_version_num = 0
        self.extensions: dict[str, str] = {}
        #: schema of each extension of the remote's powa database
        self.schemas: dict[str, str] = {}
        self.hypopg: str | None = None
        #: the main session's, for the sessions to other databases
        self.lock_timeout = "0"
        #: sessions to other databases of the server, while a snapshot reads them
        #: (replaced whole under the lock: the watchdog reads it from its thread)
        self._db_conns: tuple[Conn, ...] = ()
        self._db_lock = threading.Lock()
        #: the address the main session was opened to, for the per-database ones
        self.hostaddr: str | None = None
        #: versions must be written to the repository at the next snapshot
        self.versions_pending = False
        REDACTOR.add(server.password)

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def connect(self) -> None:
        """Connect and learn the remote's versions; RemoteUnavailable on failure."""
        self.close()
        try:
            self.hostaddr = pg.resolve(self.server.hostname, self.connect_timeout)
            conn = self._connect(self.server.dbname)
        except psycopg.Error as exc:
            raise RemoteUnavailable(one_line(exc)) from None
        # kept at once: closed by close() on any failure below, and visible to the
        # watchdog, which may have to cancel these statements
        self.conn = conn
        try:
            set_lock_timeout(conn)
            self.refresh_versions()
        except psycopg.Error as exc:
            self.close()
            raise RemoteUnavailable(one_line(exc)) from None

    def _connect(self, dbname: str, options: str | None = None) -> Conn:
        server = self.server
        return psycopg.connect(
            host=server.hostname,
            hostaddr=self.hostaddr,
            port=server.port,
            user=server.username,
            password=server.password,
            dbname=dbname,
            autocommit=True,
            application_name=f"powa-fleet worker {server.srvid}",
            connect_timeout=self.connect_timeout,
            client_encoding="UTF8",
            options=options,
            **KEEPALIVES,
        )

    def refresh_versions(self) -> None:
        """Read the remote's versions: the next snapshot stores them in the repository."""
        if self.conn is None:
            return
        row = self.conn.execute(_REMOTE_INFO).fetchone()
        assert row is not None
        self.server_version = str(row[0])
        self.server_version_num = int(row[1])
        found = {str(name): (str(v[0]), str(v[1])) for name, v in (row[2] or {}).items()}
        self.extensions = {name: version for name, (version, _) in found.items()}
        self.schemas = {name: schema for name, (_, schema) in found.items()}
        self.hypopg = None if row[3] is None else str(row[3])
        self.lock_timeout = str(row[4])
        self.powa = powa_extension(self.conn)
        if self.powa is not None and self.powa.major >= 5:
            self.conn.execute(_SECURE_SEARCH_PATH)
        self.versions_pending = True
        self.versions_read_at = time.monotonic()

    @property
    def db_conns(self) -> tuple[Conn, ...]:
        return self._db_conns

    def open_database(self, dbname: str, statement_timeout: int) -> Conn:
        """A session to another database of the server (PoWA 5's per-database sources).

        Its settings come with the connection (no statement spent on them):
        ``search_path``, the main session's ``lock_timeout``, and
        ``statement_timeout`` (ms), the budget left to the snapshot.  It goes to
        the main session's address (no name lookup per database).  It stays in
        ``db_conns`` (so the watchdog reaches it) until ``close_database()``;
        a snapshot reads at most two databases at once.  psycopg.Error when it
        cannot be opened.
        """
        settings = {"search_path": "pg_catalog", "lock_timeout": self.lock_timeout,
                    "statement_timeout": str(statement_timeout)}
        options = " ".join(f"-c {name}={_option(value)}" for name, value in settings.items())
        conn = self._connect(dbname, options=options)
        with self._db_lock:
            self._db_conns += (conn,)
        return conn

    def close_database(self, conn: Conn | None = None) -> None:
        """Close one session to another database, or all of them."""
        with self._db_lock:
            closing = self._db_conns if conn is None else (conn,)
            self._db_conns = tuple(c for c in self._db_conns if c not in closing)
        for each in closing:
            with contextlib.suppress(Exception):
                each.close()

    def close(self) -> None:
        self.close_database()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def fileno(self) -> int | None:
        if self.conn is None or self.conn.closed:
            return None
        try:
            return self.conn.pgconn.socket
        except psycopg.Error:
            return None

    def check_alive(self) -> bool:
        """Read what an idle connection received; False once the server has gone.

        Called when the socket of the idle connection turns readable: the
        server only speaks unprompted to say it is terminating the session.
        """
        conn = self.conn
        if conn is None or conn.closed:
            return False
        try:
            ready, _, _ = select.select([conn.pgconn.socket], [], [], 0)
            if ready:
                conn.pgconn.consume_input()
        except (psycopg.Error, OSError, ValueError) as exc:
            log.info("connection to the remote server lost: %s", one_line(exc))
            self.close()
            return False
        if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
            self.close()
            return False
        return True

    # the two below run in the watchdog thread while the worker may close the
    # connection: self.conn is read once

    def abort(self) -> None:
        """Shut the connections down under a statement blocked on a frozen server."""
        for conn in (*self._db_conns, self.conn):
            if conn is not None:
                pg.abort(conn)

    def cancel(self) -> None:
        """Cancel the statement running on the remote (from another thread)."""
        for conn in (*self._db_conns, self.conn):
            if conn is not None:
                pg.cancel(conn)
