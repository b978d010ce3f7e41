"""One collector per repository, one fleet per Redis prefix.

Two collectors LISTENing on one repository both answer every request, and
skip each other's snapshots; two fleets on one Redis prefix overwrite each
other's statuses.  So, before it listens, the control:

* takes a session-level advisory lock on the repository, on its LISTEN
  connection (PostgreSQL releases it when that connection ends, whatever
  becomes of the process): another powa-fleet control holding it is named
  (address, pid) and this one refuses to serve;
* looks for upstream powa-collector, whose main thread's session is named
  ``PoWA collector - main thread (...)`` without ``powa-fleet``: refused too;
* claims ``<prefix>:fleet`` in Redis for its fleet (host and directory),
  refreshed on every health check: another fleet's live claim is refused.
  A Redis that does not answer is no reason to refuse (Redis is not the
  safety here, the repository lock is).

A refused control logs why, once per reason, and tries again later: it never
exits (supervisord would restart it in a loop) and never answers.
"""

from __future__ import annotations

import logging
import os
import socket

import simplejson as json

from collector.config import Config
from collector.keys import loads
from collector.pg import Conn
from collector.repository import CONTROL_SESSION_PREFIX
from collector.syncredis import redis

log = logging.getLogger("collector.control")

#: the advisory lock of a repository's collector: ('powa', 'flt') as two int4
LOCK_KEYS = (0x706F7761, 0x666C74)
#: a fleet's Redis claim lives this long without being refreshed
CLAIM_TTL = 60

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


def fleet_identity(cfg: Config) -> dict[str, str]:
    return {"host": socket.gethostname(), "directory": str(cfg.directory)}


class Exclusive:
    def __init__(self, cfg: Config, connection: redis.Redis) -> None:
        self.cfg = cfg
        self.redis = connection
        self.key = f"{cfg.redis.prefix}:fleet"
        self.identity = fleet_identity(cfg)
        self._last_refusal: str | None = None

    def refusal(self, conn: Conn) -> str | None:
        """Why this control must not serve now, or None (the repository lock is then held)."""
        reason = self._repository(conn) or self._claim()
        if reason != self._last_refusal:
            if reason:
                log.error("not serving: %s", reason)
            elif self._last_refusal:
                log.info("serving: %s", "the other collector is gone")
            self._last_refusal = reason
        return reason

    def _repository(self, conn: Conn) -> str | None:
        row = conn.execute(_UPSTREAM, (f"{_like(CONTROL_SESSION_PREFIX)}%",)).fetchone()
        if row is not None:
            return (f"another collector serves this repository: {row[2]!r}, pid {row[0]}"
                    f" from {row[1]} (stop it, one collector per repository)")
        taken = conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s, %s)",
                             LOCK_KEYS).fetchone()
        if taken and taken[0]:
            return None
        holder = conn.execute(_HOLDER, LOCK_KEYS).fetchone()
        who = f"pid {holder[0]} from {holder[1]} ({holder[2]!r})" if holder else "a session"
        return (f"another powa-fleet control serves this repository: {who}"
                " (one fleet per repository)")

    def _claim(self) -> str | None:
        """Claim the Redis prefix for this fleet; why not, if another fleet has it."""
        mine = json.dumps({**self.identity, "pid": os.getpid()}, sort_keys=True)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.key, mine, nx=True, ex=CLAIM_TTL)
                pipe.get(self.key)
                _, current = pipe.execute()
            owner = loads(current)
            if owner is not None and {k: owner.get(k) for k in self.identity} != self.identity:
                return (f"the Redis prefix {self.cfg.redis.prefix!r} is used by the fleet in"
                        f" {owner.get('directory')!r} on host {owner.get('host')!r}:"
                        " give each fleet its own [redis] prefix")
            self.redis.set(self.key, mine, ex=CLAIM_TTL)
        except redis.RedisError as exc:
            log.debug("cannot claim the Redis prefix now: %s", exc)
        return None

    def refresh(self) -> None:
        """Keep the claim alive (on each health check of the control)."""
        self._claim()

    def release(self) -> None:
        try:
            owner = loads(self.redis.get(self.key))
            if owner is not None and owner.get("pid") == os.getpid():
                self.redis.delete(self.key)
        except redis.RedisError:
            log.debug("cannot release the Redis prefix", exc_info=True)


def _like(text: str) -> str:
    """``text`` as a literal LIKE pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
