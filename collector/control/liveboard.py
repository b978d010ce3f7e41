"""The statuses of a whole fleet, kept current from Redis channels.

Three channels say everything the control process needs to answer
WORKERS_STATUS for hundreds of servers without asking anyone:

* ``<prefix>:status``: a worker's status document, on every change;
* ``<prefix>:heartbeat``: ``"<srvid> <pid>"``, each time a worker refreshes
  its status key without change;
* ``<prefix>:programs:<host>``: supervisord's program states, from the event
  listener (collector.fleet.programs), and its five-second ticks.

The thread subscribes first, then loads the current state (so nothing falls
between the two), and after a lost connection does it again.  ``statuses()``
returns None whenever that picture may be incomplete (not loaded yet, Redis
away, the event listener silent): the caller then reads supervisord and
Redis directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector.backoff import Backoff
from collector.control.board import DISABLED, StatusBoard, derive_status
from collector.keys import (
    ALIVE_TTL,
    alive_key,
    client,
    heartbeat_channel,
    loads,
    program_name,
    programs_key,
    status_channel,
    status_key,
)
from collector.logs import Outage
from collector.syncredis import redis

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    pid: int
    status: str
    #: monotonic time the worker last showed it is alive
    at: float


class LiveBoard(threading.Thread):
    def __init__(self, direct: StatusBoard, alive_ttl: float = ALIVE_TTL) -> None:
        super().__init__(name="live-board", daemon=True)
        self.direct = direct
        self.alive_ttl = alive_ttl
        self.cfg = direct.cfg
        prefix = self.cfg.redis.prefix
        self.redis = client(self.cfg.redis.url, socket_timeout=5.0)
        self.channels = {
            status_channel(prefix): self._on_status,
            heartbeat_channel(prefix): self._on_heartbeat,
            programs_key(prefix, self.cfg.fleet.host): self._on_program,
        }
        self._lock = threading.Lock()
        self._programs: dict[str, dict[str, Any]] = {}
        self._programs_seen = 0.0
        self._workers: dict[int, _Seen] = {}
        self._synced = False
        self._closing = threading.Event()
        #: bumped on every change that may change a status: answers are cached on it
        self._version = 0
        self._cache_key: tuple[object, ...] | None = None
        self._cache: dict[int, str] = {}
        #: why the picture was last judged incomplete (None: it was complete, or never asked)
        self._incomplete: str | None = None

    # ---------------------------------------------------------------- reading
    def statuses(self) -> dict[int, str] | None:
        """Every server's status, or None when the picture may be incomplete.

        The same dict is returned until something changes (or a second passes:
        a silent worker turns stuck with time), so callers may cache on it.
        """
        now_mono = time.monotonic()
        available, enabled = self.direct.servers()
        with self._lock:
            if not self._complete(now_mono):
                return None
            key = (self._version, int(now_mono), available, enabled)
            if key == self._cache_key:
                return self._cache
            programs = dict(self._programs)
            workers = dict(self._workers)
        result = self._compute(programs, workers, available, enabled, now_mono)
        with self._lock:
            self._cache_key, self._cache = key, result
        return result

    def wait_whole(self, timeout: float, stop: Callable[[], bool]) -> bool:
        """Wait until the picture is complete (True), ``timeout`` passes or ``stop()``."""
        deadline = time.monotonic() + timeout
        while not stop():
            now = time.monotonic()
            with self._lock:
                if self._synced and now - self._programs_seen <= self.alive_ttl:
                    return True
            if now >= deadline:
                return False
            self._closing.wait(0.1)
        return False

    def program_state(self, srvid: int) -> str | None:
        """supervisord's state of a server's program while the picture is complete
        (``STOPPED`` when supervisord does not know it); None otherwise."""
        with self._lock:
            if not self._complete(time.monotonic()):
                return None
            info = self._programs.get(program_name(srvid))
        return "STOPPED" if info is None else str(info.get("state"))

    def _complete(self, now_mono: float) -> bool:
        """Whether the picture is complete (under the lock); a change of verdict is logged
        once, so that an operator sees when and why answers come from supervisord."""
        if not self._synced:
            why: str | None = "not loaded from Redis yet"
        elif now_mono - self._programs_seen > self.alive_ttl:
            why = (f"no word from the event listener for {now_mono - self._programs_seen:.0f} s"
                   if self._programs_seen else "the event listener has not said it is alive")
        else:
            why = None
        if why is not None and self._incomplete is None:
            log.warning("live status board incomplete (%s): statuses are read from "
                        "supervisord until it is whole again", why)
        elif why is None and self._incomplete is not None:
            log.info("live status board whole again")
        self._incomplete = why
        return why is None

    def _compute(
        self,
        programs: dict[str, dict[str, Any]],
        workers: dict[int, _Seen],
        available: frozenset[int],
        enabled: frozenset[int],
        now_mono: float,
    ) -> dict[int, str]:
        ttl = self.cfg.redis.status_ttl
        now = time.time()
        result = {}
        for srvid in sorted(available):
            if srvid not in enabled:
                result[srvid] = DISABLED
                continue
            info = programs.get(program_name(srvid))
            process = None if info is None else {
                "statename": info.get("state"), "pid": info.get("pid"), "start": info.get("since"),
            }
            seen = workers.get(srvid)
            if (info is not None and process is not None and process["statename"] == "STARTING"
                    and not process["pid"] and seen is not None
                    and seen.at > info.get("received", float("inf"))):
                # supervisord's STARTING event carries no pid: a status published since
                # is the starting worker's own (its predecessor had exited)
                process["pid"] = seen.pid
            document = None
            if seen is not None and now_mono - seen.at < ttl:
                document = {"pid": seen.pid, "status": seen.status}
            result[srvid] = derive_status(True, process, document, now, ttl)
        return result

    # ---------------------------------------------------------------- following
    def run(self) -> None:
        backoff = Backoff(initial=0.5, maximum=10.0)
        # one line when Redis goes, one when it is back: not one per attempt
        outage = Outage(log, "live status board lost Redis")
        while not self._closing.is_set():
            try:
                self._follow(lambda: outage.recovered("live status board following Redis again"))
            except (redis.RedisError, OSError, ValueError) as exc:
                if not self._closing.is_set():
                    outage.failed(exc)
            except Exception:
                # closing the client under a blocked read ends up here too
                if not self._closing.is_set():
                    log.exception("live status board failed, starting over")
            with self._lock:
                self._synced = False
            self._closing.wait(backoff.next_delay())

    def _follow(self, synced: Callable[[], object]) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(*self.channels)
            self._load()
            synced()
            while not self._closing.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    self.channels[_text(message["channel"])](message["data"])
        finally:
            pubsub.close()

    def _load(self) -> None:
        prefix = self.cfg.redis.prefix
        programs = {
            _text(name): document
            for name, value in self.redis.hgetall(programs_key(prefix, self.cfg.fleet.host)).items()
            if (document := loads(value)) is not None
        }
        alive = bool(self.redis.exists(alive_key(prefix, self.cfg.fleet.host)))
        available, _ = self.direct.servers()
        ids = sorted(available)
        raw = self.redis.mget([status_key(prefix, s) for s in ids]) if ids else []
        now = time.monotonic()
        workers = {}
        for srvid, text in zip(ids, raw, strict=True):
            document = loads(text)
            if document is not None:
                workers[srvid] = _Seen(int(document.get("pid") or 0),
                                       str(document.get("status")), now)
        with self._lock:
            self._programs = programs
            self._programs_seen = now if alive else 0.0
            self._workers = workers
            self._synced = True
            self._version += 1

    def _on_status(self, data: bytes) -> None:
        document = loads(data)
        if document is None or not isinstance(document.get("srvid"), int):
            return
        with self._lock:
            self._workers[document["srvid"]] = _Seen(
                int(document.get("pid") or 0), str(document.get("status")), time.monotonic()
            )
            self._version += 1

    def _on_heartbeat(self, data: bytes) -> None:
        try:
            srvid, pid = (int(part) for part in data.split())
        except ValueError:
            return
        with self._lock:
            seen = self._workers.get(srvid)
            if seen is not None and seen.pid == pid:
                seen.at = time.monotonic()

    def _on_program(self, data: bytes) -> None:
        message = loads(data)
        if message is None:
            return
        with self._lock:
            self._programs_seen = time.monotonic()
            name = message.pop("name", None)
            if isinstance(name, str):
                if message.get("removed"):
                    self._programs.pop(name, None)
                else:
                    message["received"] = self._programs_seen
                    self._programs[name] = message
                self._version += 1

    def close(self) -> None:
        self._closing.set()
        self.redis.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
