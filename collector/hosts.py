"""Several collector hosts, one fleet: who is alive, and which host collects which server.

Each host runs its own supervisord fleet from its own ``collector.cfg`` and
shares the repository and Redis (the same ``[redis] prefix``) with the
others.  Three primitives, each from what Redis and PostgreSQL offer:

* membership (Redis): each host's control writes ``<prefix>:host:<name>``
  (its directory, pid, heartbeat time, share) every ``[fleet] heartbeat``
  seconds with a TTL of three heartbeats, and adds its name to the set
  ``<prefix>:hosts``.  A host that stops heartbeating (process, machine or
  network gone) drops out by itself.  Redis is only the membership: a
  Redis that is down changes nobody's view (the last one is kept, on disk
  too: ``.hosts`` in the fleet directory);
* ownership (pure): each server belongs to the live host with the highest
  hash of (host, server id), rendezvous hashing: a host joining or leaving
  moves only its own share, and every host computes the same answer from
  the same view;
* the lease (the repository): each control holds a session-level advisory
  lock per server it owns, ``(LEASE_CLASS, srvid)``, on a repository
  session named ``powa-fleet leases <host>``.  A worker stores a snapshot
  only if, inside its snapshot transaction (with the server's
  ``powa_snapshot_metas`` row locked), no other host holds that lease; and
  a scheduled snapshot is skipped when the server's last one is younger
  than half its period.  PostgreSQL releases the locks of a session that
  dies, so a host lost with its network loses its leases too.

A name is used by one fleet directory at a time: a second fleet announcing
the same host name from another directory is refused (one name per fleet on
a Redis prefix).
"""

from __future__ import annotations

import contextlib
import hashlib
import json as stdjson
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.config import Config
from collector.keys import loads

if TYPE_CHECKING:
    from collector.syncredis import redis

log = logging.getLogger(__name__)

#: the advisory lock class of the per-server leases ('leas' as an int4)
LEASE_CLASS = 0x6C656173
#: a host is gone once its heartbeat is this many periods old
MISSED_BEATS = 3


def lease_purpose(host: str) -> str:
    """The repository session purpose (application_name) holding ``host``'s leases."""
    return f"leases {host}"


def lease_holder(application_name: str) -> str | None:
    """The host whose lease session has this application_name, None if not a lease session."""
    prefix = "powa-fleet " + lease_purpose("")
    return application_name[len(prefix):] if application_name.startswith(prefix) else None


def _weight(host: str, srvid: int) -> bytes:
    return hashlib.blake2b(f"{host}\0{srvid}".encode(), digest_size=8).digest()


def owner(srvid: int, hosts: Iterable[str]) -> str | None:
    """The host that collects ``srvid`` among ``hosts`` (rendezvous hashing), None if none."""
    return max(hosts, key=lambda host: (_weight(host, srvid), host), default=None)


def owned(srvids: Iterable[int], hosts: Iterable[str], me: str) -> list[int]:
    """The servers of ``srvids`` that ``me`` collects when ``hosts`` are alive."""
    live = sorted(set(hosts) | {me})
    return [srvid for srvid in srvids if owner(srvid, live) == me]


def shares(srvids: Iterable[int], hosts: Iterable[str]) -> dict[str, list[int]]:
    """Every live host's servers."""
    live = sorted(set(hosts))
    found: dict[str, list[int]] = {host: [] for host in live}
    for srvid in srvids:
        if (host := owner(srvid, live)) is not None:
            found[host].append(srvid)
    return found


# Set this host's document unless another directory announces the same name.
_BEAT = """
local current = redis.call('GET', KEYS[1])
if current then
    local ok, document = pcall(cjson.decode, current)
    if ok and type(document) == 'table' and document['directory'] ~= ARGV[2] then
        return current
    end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return false
"""


class Membership:
    """This host's heartbeat and the live hosts, in Redis (RedisError when it is away)."""

    def __init__(self, cfg: Config, connection: redis.Redis) -> None:
        self.cfg = cfg
        self.me = cfg.fleet.host
        self.redis = connection
        self.prefix = cfg.redis.prefix
        self.ttl = MISSED_BEATS * cfg.fleet.heartbeat
        self.started = time.time()
        self._beat = connection.register_script(_BEAT)

    def host_key(self, host: str) -> str:
        return f"{self.prefix}:host:{host}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:hosts"

    @property
    def generation_key(self) -> str:
        """Bumped by the leader on RELOAD: every host's control reloads when it moves."""
        return f"{self.prefix}:reload"

    def beat(self, **facts: Any) -> str | None:
        """Announce this host; the reason when its name is taken by another fleet."""
        document = {"host": self.me, "directory": str(self.cfg.directory), "pid": os.getpid(),
                    "started": self.started, "beat": time.time(), **facts}
        taken = self._beat(keys=[self.host_key(self.me), self.index_key],
                           args=[stdjson.dumps(document), str(self.cfg.directory), self.ttl,
                                 self.me])
        if taken is None:
            return None
        other = loads(taken) or {}
        return (f"the host name {self.me!r} is announced by the fleet in"
                f" {other.get('directory')!r}: give each fleet its own [fleet] host"
                " (or its own [redis] prefix)")

    def live(self) -> dict[str, dict[str, Any]]:
        """Every live host's document, by name (gone ones are dropped from the index)."""
        names = sorted(name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                       for name in self.redis.smembers(self.index_key))
        if not names:
            return {}
        documents = self.redis.mget([self.host_key(name) for name in names])
        found, gone = {}, []
        for name, text in zip(names, documents, strict=True):
            document = loads(text)
            if document is None:
                gone.append(name)
            else:
                found[name] = document
        if gone:
            self.redis.srem(self.index_key, *gone)
        return found

    def leave(self) -> None:
        """Drop out at once (a clean stop): the others take over without waiting."""
        current = loads(self.redis.get(self.host_key(self.me)))
        if current is not None and current.get("pid") == os.getpid():
            self.redis.delete(self.host_key(self.me))
            self.redis.srem(self.index_key, self.me)

    def bump(self) -> int:
        return int(self.redis.incr(self.generation_key))

    def generation(self) -> int:
        value = self.redis.get(self.generation_key)
        with contextlib.suppress(ValueError, TypeError):
            return int(value or 0)
        return 0


def view_file(cfg: Config) -> Path:
    """The live hosts this host's control applied last (written by the control)."""
    return cfg.directory / ".hosts"


def saved_view(cfg: Config) -> list[str] | None:
    try:
        hosts = stdjson.loads(view_file(cfg).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(hosts, list) and all(isinstance(h, str) for h in hosts):
        return hosts
    return None


def current_view(cfg: Config, connection: redis.Redis) -> tuple[list[str], str]:
    """(live hosts, where the view comes from) for a one-off run such as the generator.

    This host counts as live (it is about to collect); without Redis, the view
    the control last applied is kept, else this host alone.
    """
    from collector.syncredis import redis  # noqa: PLC0415 - the worker imports this module

    me = cfg.fleet.host
    try:
        hosts = set(Membership(cfg, connection).live()) | {me}
        return sorted(hosts), "Redis"
    except redis.RedisError as exc:
        saved = saved_view(cfg)
        if saved is not None:
            return sorted(set(saved) | {me}), f"{view_file(cfg)} (Redis unavailable: {exc})"
        return [me], f"this host alone (Redis unavailable: {exc})"
