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
import os
import select
import socket

import psycopg

from collector.errors import RemoteUnavailable
from collector.logs import REDACTOR, one_line
from collector.repository import Conn, PowaExtension, Server, powa_extension

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
        timeout_ms = max(1, self.connect_timeout) * 1000
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
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
                tcp_user_timeout=timeout_ms * 6,
            )
        except psycopg.Error as exc:
            raise RemoteUnavailable(one_line(exc)) from None
        try:
            powa = powa_extension(conn)
            row = conn.execute(_REMOTE_INFO).fetchone()
            conn.execute(
                "SELECT pg_catalog.set_config(name, '2000', false) FROM pg_catalog.pg_settings"
                " WHERE name = 'lock_timeout' AND setting = '0'"
            )
        except psycopg.Error as exc:
            conn.close()
            raise RemoteUnavailable(one_line(exc)) from None
        assert row is not None
        self.conn = conn
        self.powa = powa
        self.server_version = str(row[0])
        self.extensions = {str(k): str(v) for k, v in (row[1] or {}).items()}
        self.hypopg = None if row[2] is None else str(row[2])
        self.versions_pending = True

    def refresh_versions(self) -> None:
        """Re-read versions (after a reload): the next snapshot stores them."""
        if self.conn is None:
            return
        row = self.conn.execute(_REMOTE_INFO).fetchone()
        assert row is not None
        self.server_version = str(row[0])
        self.extensions = {str(k): str(v) for k, v in (row[1] or {}).items()}
        self.hypopg = None if row[2] is None else str(row[2])
        self.powa = powa_extension(self.conn)
        self.versions_pending = True

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

    def abort(self) -> None:
        """Shut the connection's socket down (from another thread): a query blocked on a
        frozen server fails at once instead of waiting for it forever."""
        fd = self.fileno()
        if fd is None:
            return
        with contextlib.suppress(OSError):
            # a duplicate of the descriptor: shutting it down ends the connection for both
            sock = socket.socket(fileno=os.dup(fd))
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cancel(self) -> None:
        """Cancel the statement running on the remote (from another thread)."""
        conn = self.conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=2.0)
