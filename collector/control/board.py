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

from collector.config import Config
from collector.errors import SupervisorError
from collector.fleet import files
from collector.fleet.supervisord import Supervisor
from collector.keys import STATUS_STOPPED, STATUS_STOPPING, client, loads, program_name, status_key
from collector.logs import one_line
from collector.syncredis import redis

log = logging.getLogger(__name__)

DISABLED = "disabled"
#: directories changed this recently may change again without their mtime moving
FRESH_NS = 1_000_000_000
STUCK = "stuck: running, but its status heartbeat in Redis expired"
STARTING = "starting"
#: seconds each call to supervisord may take
SUPERVISOR_TIMEOUT = 10.0


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


class StatusBoard:
    """The fleet's statuses read afresh from supervisord and Redis on every call."""

    def __init__(self, cfg: Config, redis_client: redis.Redis | None = None) -> None:
        self.cfg = cfg
        self.redis = redis_client or client(cfg.redis.url)
        self._dirs_key: tuple[int, int] | None = None
        self._servers: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())
        # the control's main thread and its live board both ask
        self._lock = threading.Lock()
        #: monotonic time supervisord last failed to answer (None: it answered)
        self.supervisor_failed_at: float | None = None

    def servers(self) -> tuple[frozenset[int], frozenset[int]]:
        """(available, enabled) server ids, read again when the directories change.

        A directory's mtime only moves at the kernel's clock tick: a symlink
        made in the same tick as our last listing would not change it.  A
        listing taken while the directories are that fresh is not kept.
        """
        try:
            key = (self.cfg.workers_available.stat().st_mtime_ns,
                   self.cfg.workers_enabled.stat().st_mtime_ns)
        except FileNotFoundError:
            return frozenset(), frozenset()
        with self._lock:
            if key != self._dirs_key:
                available = files.available(self.cfg)
                self._servers = (frozenset(available),
                                 frozenset(files.enabled(self.cfg) & available))
                fresh = time.time_ns() - max(key) < FRESH_NS
                self._dirs_key = None if fresh else key
            return self._servers

    def documents(self, srvids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Status documents of these servers, when present (RedisError if Redis is away)."""
        ids = list(srvids)
        if not ids:
            return {}
        raw = self.redis.mget([status_key(self.cfg.redis.prefix, s) for s in ids])
        found = {}
        for srvid, text in zip(ids, raw, strict=True):
            if (document := loads(text)) is not None:
                found[srvid] = document
        return found

    def views(self, srvid: int | None = None, *, timeout: float | None = SUPERVISOR_TIMEOUT,
              ) -> list[WorkerView]:
        """Every server of the fleet (or just ``srvid``; none if it is not in the fleet).

        ``timeout`` bounds each call to supervisord; None: supervisord is not
        asked, its programs are reported ``unknown: supervisord unavailable``.
        """
        available, enabled = self.servers()
        ids = sorted(available) if srvid is None else ([srvid] if srvid in available else [])
        if not ids:
            return []
        wanted = [s for s in ids if s in enabled]
        processes = (None if timeout is None
                     else self._processes(wanted, single=srvid is not None, timeout=timeout))
        try:
            documents = self.documents(wanted)
            redis_problem = None
        except redis.RedisError as exc:
            documents, redis_problem = {}, one_line(exc)
        now = time.time()
        views = []
        for server in ids:
            process = processes.get(program_name(server)) if processes is not None else None
            document = documents.get(server)
            if processes is None and server in enabled:
                status = "unknown: supervisord unavailable"
            elif processes is None:
                # disabled: the symlinks say so, supervisord need not be asked
                status = DISABLED
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

    def _processes(self, wanted: list[int], single: bool, timeout: float,
                   ) -> dict[str, dict[str, Any]] | None:
        try:
            supervisor = Supervisor(self.cfg.supervisor_socket, timeout=timeout)
            if not single:
                infos = supervisor.all_processes()
            else:
                infos = {}
                for srvid in wanted:
                    info = supervisor.process(program_name(srvid))
                    if info is not None:
                        infos[info["name"]] = info
        except SupervisorError as exc:
            self.supervisor_failed_at = time.monotonic()
            log.warning("cannot read process states: %s", exc)
            return None
        self.supervisor_failed_at = None
        return infos

    def statuses(self, srvid: int | None = None, *,
                 timeout: float | None = SUPERVISOR_TIMEOUT) -> dict[int, str]:
        return {view.srvid: view.status for view in self.views(srvid, timeout=timeout)}

    def close(self) -> None:
        self.redis.close()
