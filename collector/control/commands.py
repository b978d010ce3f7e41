"""The control's answers to WORKERS_STATUS, FORCE_SNAPSHOT and REFRESH_DB_CAT.

WORKERS_STATUS comes from the live board (Redis channels, no supervisord
call) while its picture is complete, the whole fleet's cached while nothing
changes; else from supervisord and Redis, each call bounded and not repeated
for a while after a failure (``_direct``).
FORCE_SNAPSHOT and REFRESH_DB_CAT are checked here (server known, enabled,
its program running) and asked to the worker through the mailbox, whose
answer is the protocol's answer.  RELOAD is the reload thread's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from collector import mailbox
from collector.config import Config
from collector.control import protocol
from collector.control.board import DISABLED, StatusBoard, WorkerView
from collector.control.liveboard import LiveBoard
from collector.control.protocol import Request
from collector.errors import ProtocolError
from collector.keys import program_name
from collector.pg import PowaExtension
from collector.syncredis import redis

#: how long FORCE_SNAPSHOT and REFRESH_DB_CAT wait for the worker's answer
WORKER_REPLY_TIMEOUT = 1.0
#: seconds a request may wait on supervisord (powa-web gives up after 3 s)
DIRECT_TIMEOUT = 2.0
#: after supervisord failed to answer a request, it is not asked again for this long
DIRECT_RETRY = 15.0


class Commands:
    def __init__(self, cfg: Config, board: StatusBoard, live: LiveBoard,
                 connection: redis.Redis, powa: Callable[[], PowaExtension | None], *,
                 others: Callable[[], dict[int, str]] = dict) -> None:
        self.cfg = cfg
        #: servers other hosts of the fleet collect, and which host (collector.hosts)
        self.others = others
        self.board = board
        self.live = live
        self.redis = connection
        #: the repository's PoWA, as the control's connection last saw it
        self.powa = powa
        self.mailbox_key = mailbox.fleet_key(cfg.directory)
        #: the last whole-fleet statuses from the live board, and their JSON
        self._fleet_answer: tuple[dict[int, str] | None, str] = (None, "")

    def workers_status(self, request: Request) -> tuple[str, str]:
        if not request.answers:
            return "OK", ""
        wanted = None
        # like upstream: only the first argument counts, a non-number means all
        if request.args and protocol.is_id(request.args[0]):
            wanted = int(request.args[0])
        others = self.others()
        if wanted is not None and wanted in others:
            return "OK", protocol.workers_status_json(self._remote({wanted: others[wanted]}),
                                                      self._room(request))
        live = self.live.statuses()
        if live is None:
            # the live picture is incomplete: ask supervisord and Redis now
            statuses = self._direct(wanted)
        elif wanted is not None:
            statuses = {wanted: live[wanted]} if wanted in live else {}
        elif live is self._fleet_answer[0] and not others:
            # unchanged since the last request: the live board hands the same dict back
            return "OK", self._fleet_answer[1]
        else:
            statuses = live
        if wanted is None and others:
            statuses = {**self._remote(others), **statuses}
        data = protocol.workers_status_json(statuses, self._room(request))
        if live is not None and wanted is None and not others:
            self._fleet_answer = (live, data)
        return "OK", data

    def _direct(self, wanted: int | None) -> dict[int, str]:
        """Statuses read from supervisord and Redis, in the request's own time.

        Each call to supervisord is bounded by DIRECT_TIMEOUT; once it failed,
        it is not asked again for DIRECT_RETRY seconds (its programs are then
        ``unknown: supervisord unavailable``): a hung supervisord never holds
        the control's loop for more than one timeout in a while.
        """
        return self.board.statuses(wanted, timeout=self._supervisor_timeout())

    def _supervisor_timeout(self) -> float | None:
        failed = self.board.supervisor_failed_at
        if failed is not None and time.monotonic() - failed < DIRECT_RETRY:
            return None
        return DIRECT_TIMEOUT

    @staticmethod
    def _room(request: Request) -> int:
        return protocol.MAX_PAYLOAD - len(f"{request.command} OK ".encode())

    def _remote(self, others: dict[int, str]) -> dict[int, str]:
        """Statuses of servers other hosts collect: their workers' own, from Redis."""
        try:
            documents = self.board.documents(others)
        except redis.RedisError:
            return {s: "unknown: Redis unavailable" for s in others}
        return {srvid: str(documents[srvid].get("status") or "unknown")
                if srvid in documents else f"unknown: no status from host {host}"
                for srvid, host in others.items()}

    def force_snapshot(self, request: Request) -> tuple[str, str]:
        srvid = protocol.parse_srvid(request.args)
        if srvid in self.others():
            # its owner's worker answers through the same mailbox (the fleet's key)
            return mailbox.ask(self.redis, self.cfg.redis.prefix, srvid, "force_snapshot",
                               WORKER_REPLY_TIMEOUT, key=self.mailbox_key)
        self._check_running(srvid)
        return mailbox.ask(self.redis, self.cfg.redis.prefix, srvid, "force_snapshot",
                           WORKER_REPLY_TIMEOUT, key=self.mailbox_key)

    def refresh_db_cat(self, request: Request) -> tuple[str, str]:
        """Queued by the worker for its next snapshot (PoWA 5 keeps per-database catalogs)."""
        srvid, dbnames = protocol.parse_refresh_db_cat(request.args)
        powa = self.powa()
        assert powa is not None
        if powa.major < 5:
            raise ProtocolError(
                f"REFRESH_DB_CAT needs PoWA 5 or later on the repository: it has PoWA"
                f" {powa.version}, which keeps no per-database catalogs"
            )
        if srvid in self.others():
            return mailbox.ask(self.redis, self.cfg.redis.prefix, srvid, "refresh_db_cat",
                               WORKER_REPLY_TIMEOUT, key=self.mailbox_key, args=dbnames)
        self._check_running(srvid)
        return mailbox.ask(self.redis, self.cfg.redis.prefix, srvid, "refresh_db_cat",
                           WORKER_REPLY_TIMEOUT, key=self.mailbox_key,
                           args=dbnames)

    def _check_running(self, srvid: int) -> None:
        """ProtocolError unless the server is in the fleet, enabled, and its program runs.

        From the live board when its picture is complete: a request never
        waits on supervisord then (it answers late while it starts hundreds
        of programs).
        """
        statuses = self.live.statuses()
        state = self.live.program_state(srvid) if statuses is not None else None
        if statuses is None or state is None:
            view = self._view(srvid)
            status, state = view.status, view.program_state
        elif srvid not in statuses:
            raise ProtocolError(f"Server id {srvid} not found")
        else:
            status = statuses[srvid]
        if status == DISABLED:
            raise ProtocolError(f"Server id {srvid} is disabled (no symlink in workers_enabled/)")
        if state != "RUNNING":
            raise ProtocolError(f"{program_name(srvid)} is not running ({status})")

    def _view(self, srvid: int) -> WorkerView:
        views = self.board.views(srvid, timeout=self._supervisor_timeout())
        if not views:
            raise ProtocolError(f"Server id {srvid} not found")
        return views[0]
