"""The status board of a fleet: supervisord's process states and the workers' Redis status.

A worker's own status string is only trusted while its program runs and its
status key is alive and written by that very process; otherwise the
program state speaks (``stopped``, ``stopping``...), and a running program
whose key expired is reported as stuck.  Used by the control process
(WORKERS_STATUS) and by the operator CLI.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import simplejson as json

from collector import fleet
from collector.config import Config
from collector.errors import SupervisorError
from collector.logs import one_line
from collector.status import STATUS_STOPPED, STATUS_STOPPING, client, status_key
from collector.supervisord import Supervisor

log = logging.getLogger(__name__)

DISABLED = "disabled"
STUCK = "stuck: running, but its status heartbeat in Redis expired"
STARTING = "starting"


_PROGRAM_STATES = {
    "STARTING": STARTING,
    "BACKOFF": "restarting after a crash (BACKOFF)",
    "STOPPING": STATUS_STOPPING,
    "STOPPED": STATUS_STOPPED,
    "EXITED": STATUS_STOPPED,
    "FATAL": "stopped: could not be started (FATAL), see its log",
}


@dataclass(frozen=True)
class WorkerView:
    srvid: int
    enabled: bool
    #: supervisord state name, None when supervisord does not know the program
    program_state: str | None
    pid: int | None
    #: the worker's status document from Redis, if alive
    document: Mapping[str, Any] | None
    status: str


def derive_status(
    enabled: bool,
    process: Mapping[str, Any] | None,
    document: Mapping[str, Any] | None,
    now: float,
    ttl: float,
) -> str:
    """The protocol status string of one server (pure, see module docstring)."""
    if not enabled:
        return DISABLED
    if process is None:
        return "not loaded in supervisord (apply pending: RELOAD or --apply)"
    state = str(process.get("statename", "UNKNOWN"))
    # STARTING only means "younger than startsecs": the worker may already report
    if state in ("RUNNING", "STARTING") and document is not None and (
        document.get("pid") == process.get("pid")
    ):
        return str(document.get("status") or "unknown")
    if state != "RUNNING":
        return _PROGRAM_STATES.get(state, f"unknown program state {state}")
    # a worker publishes its first status a moment after it starts
    return STARTING if now - float(process.get("start") or 0) < ttl else STUCK


class ProcessCache:
    """supervisord's process table, at most ``max_age`` seconds old.

    A thread keeps it fresh while it is in use, so that answering the status
    of a whole fleet does not wait for a full XML-RPC round trip.
    """

    def __init__(self, cfg: Config, max_age: float = 1.0) -> None:
        self.cfg = cfg
        self.max_age = max_age
        self._lock = threading.Lock()
        self._table: dict[str, dict[str, Any]] = {}
        self._fetched = 0.0
        self._used = 0.0
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def get(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            self._used = now
            fresh = now - self._fetched <= self.max_age
            table = self._table
        if not fresh:
            table = self.refresh()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="process-cache", daemon=True)
            self._thread.start()
        return table

    def refresh(self) -> dict[str, dict[str, Any]]:
        table = Supervisor(self.cfg.supervisor_socket, timeout=10).all_processes()
        with self._lock:
            self._table, self._fetched = table, time.monotonic()
        return table

    def invalidate(self) -> None:
        with self._lock:
            self._fetched = 0.0

    def _run(self) -> None:
        while not self._closing.wait(self.max_age / 2):
            if time.monotonic() - self._used > 60:
                continue
            try:
                self.refresh()
            except SupervisorError as exc:
                log.debug("process table refresh failed: %s", exc)

    def close(self) -> None:
        self._closing.set()


class StatusBoard:
    def __init__(self, cfg: Config, redis_client: redis.Redis | None = None) -> None:
        self.cfg = cfg
        self.redis = redis_client or client(cfg.redis.url)
        self.processes = ProcessCache(cfg)
        self._dirs_key: tuple[int, int] | None = None
        self._servers: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())

    def servers(self) -> tuple[frozenset[int], frozenset[int]]:
        """(available, enabled) server ids, read again when the directories change."""
        try:
            key = (self.cfg.workers_available.stat().st_mtime_ns,
                   self.cfg.workers_enabled.stat().st_mtime_ns)
        except FileNotFoundError:
            return frozenset(), frozenset()
        if key != self._dirs_key:
            available = fleet.available(self.cfg)
            self._servers = (frozenset(available), frozenset(fleet.enabled(self.cfg) & available))
            self._dirs_key = key
        return self._servers

    def documents(self, srvids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Status documents of these servers, when present (RedisError if Redis is away)."""
        ids = list(srvids)
        if not ids:
            return {}
        raw = self.redis.mget([status_key(self.cfg.redis.prefix, s) for s in ids])
        found = {}
        for srvid, text in zip(ids, raw, strict=True):
            if text is None:
                continue
            try:
                document = json.loads(text)
            except ValueError:
                continue
            if isinstance(document, dict):
                found[srvid] = document
        return found

    def views(self, srvid: int | None = None) -> list[WorkerView]:
        """Every server of the fleet (or just ``srvid``; none if it is not in the fleet)."""
        available, enabled = self.servers()
        ids = sorted(available) if srvid is None else ([srvid] if srvid in available else [])
        if not ids:
            return []
        wanted = [s for s in ids if s in enabled]
        processes = self._processes(wanted, single=srvid is not None)
        try:
            documents = self.documents(wanted)
            redis_problem = None
        except redis.RedisError as exc:
            documents, redis_problem = {}, one_line(exc)
        now = time.time()
        views = []
        for server in ids:
            process = processes.get(fleet.program_name(server)) if processes is not None else None
            document = documents.get(server)
            if processes is None:
                status = "unknown: supervisord unavailable"
            elif redis_problem and process and process.get("statename") == "RUNNING":
                status = "unknown: Redis unavailable"
            else:
                status = derive_status(server in enabled, process, document, now,
                                       self.cfg.redis.status_ttl)
            views.append(WorkerView(
                srvid=server,
                enabled=server in enabled,
                program_state=str(process["statename"]) if process else None,
                pid=int(process["pid"]) if process and process.get("pid") else None,
                document=document,
                status=status,
            ))
        return views

    def _processes(self, wanted: list[int], single: bool) -> dict[str, dict[str, Any]] | None:
        try:
            if single:
                # one server: ask now, it is cheap and always current
                supervisor = Supervisor(self.cfg.supervisor_socket, timeout=10)
                infos = {}
                for srvid in wanted:
                    info = supervisor.process(fleet.program_name(srvid))
                    if info is not None:
                        infos[info["name"]] = info
                return infos
            return self.processes.get()
        except SupervisorError as exc:
            log.warning("cannot read process states: %s", exc)
            return None

    def statuses(self, srvid: int | None = None) -> dict[int, str]:
        return {view.srvid: view.status for view in self.views(srvid)}

    def close(self) -> None:
        self.processes.close()
        self.redis.close()
