"""This host's leases: one session-level advisory lock per server it collects.

Held on a repository session of their own, named ``powa-fleet leases
<host>`` (see collector.hosts): workers look for that name when they check,
inside their snapshot transaction, that no other host holds their server.
PostgreSQL releases the locks when the session ends, however it ends; the
session asks the server to probe the connection (TCP keepalives of a few
seconds), so a host cut off from the network loses its leases within about
half a minute instead of the kernel's two hours.

``keep()`` is called on every heartbeat of the host keeper: it takes the
leases of servers this host now owns (those still held by a host that is
handing them over are taken at a later call) and releases those it no
longer owns.  Taking or releasing them all is one statement each.
"""

from __future__ import annotations

import logging
import threading

import psycopg

from collector import hosts, logs, repository
from collector.config import Config
from collector.errors import RepositoryUnavailable
from collector.pg import Conn

log = logging.getLogger("collector.control")

#: the server probes a silent lease session after 5 s, every 2 s, 3 times
_PROBES = """
SELECT pg_catalog.set_config('tcp_keepalives_idle', '5', false),
       pg_catalog.set_config('tcp_keepalives_interval', '2', false),
       pg_catalog.set_config('tcp_keepalives_count', '3', false),
       pg_catalog.set_config('tcp_user_timeout', '15000', false)
"""
_TAKE = """
SELECT s FROM pg_catalog.unnest(%s::int4[]) s
 WHERE pg_catalog.pg_try_advisory_lock(%s, s)
"""
_RELEASE = "SELECT pg_catalog.pg_advisory_unlock(%s, s) FROM pg_catalog.unnest(%s::int4[]) s"
_HOLDERS = """
SELECT l.objid::int4, a.application_name
  FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objsubid = 2 AND l.granted
   AND l.objid = ANY(%s::int4[]::oid[])
"""


class Leases:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.conn: Conn | None = None
        self.held: set[int] = set()
        self._wanted: set[int] | None = None
        self._lock = threading.Lock()
        self._outage = logs.Outage(log, "cannot hold this host's leases in the repository")
        self._waiting: dict[int, str] = {}

    def want(self, srvids: set[int]) -> None:
        """The servers this host collects now (set by each reload)."""
        with self._lock:
            self._wanted = set(srvids)

    def keep(self) -> None:
        """Take and release leases to match what is wanted; never raises."""
        with self._lock:
            wanted = None if self._wanted is None else set(self._wanted)
        if wanted is None:
            return
        try:
            conn = self._connection()
            release = sorted(self.held - wanted)
            if release:
                conn.execute(_RELEASE, (hosts.LEASE_CLASS, release))
                self.held -= set(release)
                log.info("leases released: %d server(s)", len(release))
            missing = sorted(wanted - self.held)
            if missing:
                rows = conn.execute(_TAKE, (missing, hosts.LEASE_CLASS)).fetchall()
                self.held |= {int(row[0]) for row in rows}
                self._log_waiting(conn, sorted(wanted - self.held))
        except (psycopg.Error, RepositoryUnavailable) as exc:
            self._outage.failed(exc)
            self.close()
            return
        self._outage.recovered("holding this host's leases again")

    def _log_waiting(self, conn: Conn, waiting: list[int]) -> None:
        """Name the hosts still holding servers handed to this one (once per change)."""
        holders: dict[int, str] = {}
        if waiting:
            for srvid, name in conn.execute(_HOLDERS, (hosts.LEASE_CLASS, waiting)):
                holders[int(srvid)] = hosts.lease_holder(str(name)) or str(name)
        if holders != self._waiting and holders:
            log.info("waiting for %d lease(s) still held elsewhere: %s", len(holders),
                     ", ".join(f"server {s} by {h}" for s, h in sorted(holders.items())[:10]))
        self._waiting = holders

    def _connection(self) -> Conn:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.close()
            conn = repository.connect(self.cfg.repository.dsn,
                                      hosts.lease_purpose(self.cfg.fleet.host),
                                      self.cfg.repository.connect_timeout)
            conn.autocommit = True
            conn.execute(_PROBES)
            self.conn = conn
        return self.conn

    def close(self) -> None:
        """Drop the session: PostgreSQL releases every lease it held."""
        conn, self.conn = self.conn, None
        self.held = set()
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing the lease session failed", exc_info=True)
