"""One collector per repository: the leader of the fleet's hosts.

Two collectors LISTENing on one repository both answer every request, and
skip each other's snapshots.  So, before it listens, the control:

* takes a session-level advisory lock on the repository, on its LISTEN
  connection (PostgreSQL releases it when that connection ends, whatever
  becomes of the process).  The holder is the fleet's leader: the one control
  that answers powa-web.  When the holder is the control of another live host
  of this fleet (collector.hosts: its heartbeat names the backend holding the
  lock), this one follows: it keeps its host's programs, leases and heartbeat,
  and takes over as soon as the lock is free.  Any other holder is another
  collector: named (address, pid), and this one refuses to serve;
* looks for upstream powa-collector, whose main thread's session is named
  ``PoWA collector - main thread (...)`` without ``powa-fleet``: refused too.

A refused or following control logs why, once per reason, and tries again
later: it never exits (supervisord would restart it in a loop).  A second
fleet on the same Redis prefix under the same host name is refused by the
host keeper (collector.hosts.Membership).
"""

from __future__ import annotations

import logging

from collector import hosts
from collector.config import Config
from collector.pg import Conn
from collector.repository import CONTROL_SESSION_PREFIX
from collector.syncredis import redis

log = logging.getLogger("collector.control")

#: the advisory lock of a repository's collector: ('powa', 'flt') as two int4
LOCK_KEYS = (0x706F7761, 0x666C74)

_HOLDER = """
SELECT a.pid, coalesce(host(a.client_addr), 'local'), a.application_name
  FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.objsubid = 2
   AND l.granted AND l.pid <> pg_catalog.pg_backend_pid()
"""
_UPSTREAM = """
SELECT a.pid, coalesce(host(a.client_addr), 'local'), a.application_name
  FROM pg_catalog.pg_stat_activity a
 WHERE a.application_name LIKE %s AND a.application_name NOT LIKE '%%(powa-fleet %%'
   AND a.pid <> pg_catalog.pg_backend_pid()
"""


class Exclusive:
    def __init__(self, cfg: Config, connection: redis.Redis) -> None:
        self.cfg = cfg
        self.membership = hosts.Membership(cfg, connection)
        self._last_refusal: str | None = None
        #: the live host whose control leads, while this one follows it
        self.leader: str | None = None

    def refusal(self, conn: Conn) -> str | None:
        """Why this control must not serve now, or None (the repository lock is then held)."""
        reason = self._repository(conn)
        if reason != self._last_refusal:
            if reason and self.leader:
                log.info("following: %s", reason)
            elif reason:
                log.error("not serving: %s", reason)
            elif self._last_refusal:
                log.info("serving: %s", "the other collector is gone")
            self._last_refusal = reason
        return reason

    def _repository(self, conn: Conn) -> str | None:
        self.leader = None
        row = conn.execute(_UPSTREAM, (f"{_like(CONTROL_SESSION_PREFIX)}%",)).fetchone()
        if row is not None:
            return (f"another collector serves this repository: {row[2]!r}, pid {row[0]}"
                    f" from {row[1]} (stop it, one collector per repository)")
        taken = conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s, %s)",
                             LOCK_KEYS).fetchone()
        if taken and taken[0]:
            return None
        holder = conn.execute(_HOLDER, LOCK_KEYS).fetchone()
        self.leader = self._host_of(int(holder[0])) if holder else None
        if self.leader is not None:
            return f"host {self.leader} leads the fleet and answers powa-web"
        who = f"pid {holder[0]} from {holder[1]} ({holder[2]!r})" if holder else "a session"
        return (f"another powa-fleet control serves this repository: {who}"
                " (one fleet per repository, or the same [redis] for every host of a fleet)")

    def _host_of(self, backend_pid: int) -> str | None:
        """The live host of this fleet whose control holds the lock through ``backend_pid``."""
        try:
            live = self.membership.live()
        except redis.RedisError as exc:
            log.debug("cannot tell which host leads: %s", exc)
            return None
        for name, document in live.items():
            if name != self.cfg.fleet.host and document.get("backend_pid") == backend_pid:
                return name
        return None


def _like(text: str) -> str:
    """``text`` as a literal LIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
