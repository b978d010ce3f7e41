"""The host keeper: this host's heartbeat, the view of live hosts, and its leases.

A thread of the control, on every host (leader or not).  Every ``[fleet]
heartbeat`` seconds it:

* announces this host (collector.hosts.Membership), with its share and, on
  the leader, the repository backend that holds the leader's lock (so the
  others can tell their leader from a foreign collector);
* reads the live hosts; a view that differs from the applied one and stays
  the same for one more heartbeat is applied: it is handed to the reload
  thread and a reload regenerates this host's programs for its new share
  (a host joining or leaving moves only its share, collector.hosts.owner);
  waiting one heartbeat keeps a Redis that comes back empty, or a host
  starting, from moving servers back and forth;
* follows the reload generation: a RELOAD answered by the leader bumps it,
  and every host reloads;
* keeps this host's leases (collector.control.leases).

Redis down: nothing changes (the last view stays applied, its leases stay
held), and the outage is logged once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from collector import hosts, logs
from collector.config import Config
from collector.control.leases import Leases
from collector.control.reload import Reloader
from collector.fleet.files import write_atomic
from collector.keys import client
from collector.syncredis import redis

log = logging.getLogger("collector.control")


class HostKeeper(threading.Thread):
    def __init__(self, cfg: Config, reloader: Reloader, leases: Leases,
                 leader: Callable[[], dict[str, Any]]) -> None:
        super().__init__(name="hosts", daemon=True)
        self.cfg = cfg
        self.reloader = reloader
        self.leases = leases
        self.leader = leader
        self.redis = client(cfg.redis.url)
        self.membership = hosts.Membership(cfg, self.redis)
        self.applied: list[str] | None = hosts.saved_view(cfg)
        self._pending: list[str] | None = None
        self._generation: int | None = None
        self._refused: str | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._bump = False
        self._outage = logs.Outage(log, "cannot see the other collector hosts in Redis")
        #: set after each heartbeat (tests and the control wait on it)
        self.beaten = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                if self._bump:
                    self._bump = False
                    self._spread_reload()
                self.beat()
            except Exception:
                log.exception("host heartbeat failed, going on")
            self.leases.keep()
            self.beaten.set()
            self._wake.wait(self.cfg.fleet.heartbeat)

    def beat(self) -> None:
        try:
            refusal = self.membership.beat(servers=len(self.leases.held), **self.leader())
            if refusal is None:
                live = self.membership.live()
                generation = self.membership.generation()
        except redis.RedisError as exc:
            self._outage.failed(exc)
            return
        self._outage.recovered("the other collector hosts are visible again")
        if refusal != self._refused:
            if refusal:
                log.error("not sharing the fleet: %s", refusal)
            self._refused = refusal
        if refusal is not None:
            return
        self._follow(generation)
        self._see(sorted(set(live) | {self.cfg.fleet.host}))

    def _follow(self, generation: int) -> None:
        if self._generation is not None and generation != self._generation:
            log.info("RELOAD asked on another host: reloading")
            self.reloader.request(None)
        self._generation = generation

    def _see(self, view: list[str]) -> None:
        if view == self.applied:
            self._pending = None
            return
        if view != self._pending:
            # not yet: the same view must be seen again one heartbeat later
            self._pending = view
            if self.applied is not None:
                return
        before, self.applied, self._pending = self.applied, view, None
        log.info("live collector hosts: %s (were %s): taking this host's share",
                 ", ".join(view), ", ".join(before) if before else "unknown")
        try:
            write_atomic(hosts.view_file(self.cfg), json.dumps(view) + "\n")
        except OSError as exc:
            log.warning("cannot keep the view of live hosts in %s: %s",
                        hosts.view_file(self.cfg), exc)
        self.reloader.share(view)
        self.reloader.request(None)

    def bump(self) -> None:
        """A RELOAD reached this (leader) host: every other host reloads too.

        Done by this thread: a hung Redis must not delay the NOTIFY loop.
        """
        self._bump = True
        self._wake.set()

    def _spread_reload(self) -> None:
        try:
            self._generation = self.membership.bump()
        except redis.RedisError as exc:
            log.warning("RELOAD reaches this host only: %s", logs.one_line(exc))

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(5)
        try:
            self.membership.leave()
        except redis.RedisError:
            log.debug("cannot leave the fleet's hosts", exc_info=True)
        self.leases.close()
        self.redis.close()
