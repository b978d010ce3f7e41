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
import time

import psycopg

from collector import pg
from collector.errors import RemoteUnavailable
from collector.logs import REDACTOR, one_line
from collector.pg import KEEPALIVES, Conn, PowaExtension, powa_extension, set_lock_timeout
from collector.repository import Server

log = logging.getLogger(__name__)

_REMOTE_INFO = """
SELECT current_setting('server_version'),
       (SELECT json_object_agg(extname, extversion) FROM pg_catalog.pg_extension),
       (SELECT default_version FROM pg_catalog.pg_available_extensions WHERE name = 'hypopg')
"""


class RemoteSession:
    """Connection to one remote server, with what a snapshot needs to know about it."""

    def __init__(self, server: Server, connect_timeout: int = 5) -> None:
        self.server = server
        self.connect_timeout = connect_timeout
        self.versions_read_at = 0.0
        self.conn: Conn | None = None
        self.powa: PowaExtension | None = None
        self.server_version = ""
        self.extensions: dict[str, str] = {}
        self.hypopg: str | None = None
        #: versions must be written to the repository at the next snapshot
        self.versions_pending = False
        REDACTOR.add(server.password)

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def connect(self) -> None:
        """Connect and learn the remote's versions; RemoteUnavailable on failure."""
        self.close()
        server = self.server
        try:
            conn = psycopg.connect(
                host=server.hostname,
                port=server.port,
                user=server.username,
                password=server.password,
                dbname=server.dbname,
                autocommit=True,
                application_name=f"powa-fleet worker {server.srvid}",
                connect_timeout=self.connect_timeout,
                client_encoding="UTF8",
                **KEEPALIVES,
            )
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

    def refresh_versions(self) -> None:
        """Read the remote's versions: the next snapshot stores them in the repository."""
        if self.conn is None:
            return
        row = self.conn.execute(_REMOTE_INFO).fetchone()
        assert row is not None
        self.server_version = str(row[0])
        self.extensions = {str(k): str(v) for k, v in (row[1] or {}).items()}
        self.hypopg = None if row[2] is None else str(row[2])
        self.powa = powa_extension(self.conn)
        self.versions_pending = True
        self.versions_read_at = time.monotonic()

    def close(self) -> None:
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
        """Shut the connection down under a statement blocked on a frozen server."""
        conn = self.conn
        if conn is not None:
            pg.abort(conn)

    def cancel(self) -> None:
        """Cancel the statement running on the remote (from another thread)."""
        conn = self.conn
        if conn is not None:
            pg.cancel(conn)
