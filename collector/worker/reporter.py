"""How a worker tells the world: its status document in Redis, and events to the plugins.

The loop decides what the status is; the reporter logs its changes, hands
the document to the publishing thread, and emits ``status_changed``,
``snapshot_done`` and ``snapshot_failed`` to the plugins.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from collector.config import Config
from collector.keys import STATUS_STOPPED
from collector.plugins import Dispatcher
from collector.worker.gate import ForceGate
from collector.worker.publisher import StatusPublisher
from collector.worker.schedule import Schedule
from collector.worker.snapshot import SnapshotResult
from collector.worker.state import ServerState, result_fields

log = logging.getLogger("collector.worker")

#: a snapshot's start is in Redis within this (seconds), unless its end comes first
START_WRITE_WITHIN = 1.0


class Reporter:
    def __init__(self, state: ServerState, gate: ForceGate, events: Dispatcher) -> None:
        self.state = state
        self.gate = gate
        self.events = events
        self.schedule: Schedule | None = None
        self.publisher: StatusPublisher | None = None
        self.last_status: str | None = None

    def start(self, cfg: Config) -> None:
        """Publish from now on (a ``--once`` run never does: a running worker owns the key)."""
        self.publisher = StatusPublisher(cfg.redis.url, cfg.redis.prefix, self.state.srvid,
                                         cfg.redis.status_ttl, host=cfg.fleet.host)
        self.publisher.start()

    def document(self, status: str) -> dict[str, Any]:
        return self.state.document(status, self.gate.view(), self.schedule, time.monotonic())

    def publish(self, status: str, within: float = 0.0, inline: bool = False) -> None:
        """The current status to Redis (within that many seconds); a change is logged
        and told to the plugins at once.  ``inline``: written by this thread if Redis
        is answering (see StatusPublisher.write_now)."""
        if status != self.last_status:
            if self.last_status is not None:
                log.info("status: %s -> %s", self.last_status, status)
                self.events.emit("status_changed", {
                    **self.state.event(status), "previous_status": self.last_status,
                })
            self.last_status = status
        if inline and self.publisher is not None:
            self.publisher.write_now(self.document(status), self._expected())
        else:
            self.quick(status, within)

    def quick(self, status: str, within: float = 0.0) -> None:
        """Hand a document to the publishing thread only (safe from any thread)."""
        if self.publisher is not None:
            self.publisher.update(self.document(status), within, self._expected())

    def _expected(self) -> float:
        """When the next snapshot's start must be in Redis: the publishing thread plans
        to be awake then, so that start does not have to wake it."""
        schedule = self.schedule
        return schedule.next_due + START_WRITE_WITHIN if schedule is not None else float("inf")

    def error(self, text: str) -> None:
        """Record an error, logged once while it stays the same."""
        if self.state.error(text):
            log.error("%s", self.state.last_error)

    def snapshot(self, result: SnapshotResult | None, status: str) -> None:
        """Account for a snapshot that ended, tell the plugins, publish."""
        for error in self.state.account(result):
            log.error("%s", error)
        fields = result_fields(result) if result is not None else {}
        if result is not None and result.outcome != "failed":
            log.info(
                "snapshot of server %d stored in %.3fs (%d rows, %d errors)",
                self.state.srvid, result.duration, sum(result.rows.values()),
                result.error_count,
            )
            self.events.emit("snapshot_done", {**self.state.event(status), **fields})
        else:
            self.events.emit("snapshot_failed", {**self.state.event(status), **fields,
                                                 "error": self.state.last_error})
        # this thread is running: writing the end here is cheaper than waking the thread
        self.publish(status, inline=True)

    def close(self) -> None:
        """The final ``stopped`` status (plugins hear of it before they are closed)."""
        if self.state.server is not None and self.publisher is not None:
            self.publish(STATUS_STOPPED)
        if self.publisher is not None:
            self.publisher.close(self.document(STATUS_STOPPED))
