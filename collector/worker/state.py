"""What a worker knows of its server between snapshots: counters, the last result, errors.

Pure bookkeeping, no I/O: the loop feeds it outcomes, the reporter turns it
into the status document and plugin events.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from collector import __version__, spawning
from collector.keys import iso, program_name
from collector.logs import one_line
from collector.repository import Server
from collector.worker.gate import GateView
from collector.worker.schedule import Schedule
from collector.worker.snapshot import SnapshotResult


class ServerState:
    def __init__(self, srvid: int, wall: Callable[[], float] = time.time,
                 host: str | None = None) -> None:
        self.srvid = srvid
        #: the collector host's name ([fleet] host), in every status document
        self.host = host or socket.gethostname()
        self.wall = wall
        self.server: Server | None = None
        self.started_at = wall()
        self.last_result: SnapshotResult | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.snapshots_ok = 0
        self.snapshots_failed = 0
        self.consecutive_failures = 0
        self.repository_down = False
        #: the host holding this server's lease while it is not this one (collector.hosts)
        self.held_by: str | None = None

    @property
    def alias(self) -> str | None:
        return self.server.alias if self.server else None

    def error(self, text: str) -> bool:
        """Record an error; True when it differs from the last one (worth a log line)."""
        text = one_line(text)
        new = text != self.last_error
        self.last_error, self.last_error_at = text, self.wall()
        return new

    def account(self, result: SnapshotResult | None) -> list[str]:
        """Count a snapshot's outcome; the new errors it brought, to be logged."""
        self.last_result = result
        stored = result is not None and result.outcome != "failed"
        if stored:
            self.snapshots_ok += 1
            self.consecutive_failures = 0
        else:
            self.snapshots_failed += 1
            self.consecutive_failures += 1
        if result is None:
            return []
        if stored and not result.errors:
            # a clean snapshot: the last error is history
            self.last_error = None
        return [error for error in result.errors if self.error(error)]

    def event(self, status: str) -> dict[str, Any]:
        """What every plugin event carries."""
        return {
            "srvid": self.srvid,
            "alias": self.alias,
            "status": status,
            "host": self.host,
            "time": iso(self.wall()),
            "snapshots_ok": self.snapshots_ok,
            "snapshots_failed": self.snapshots_failed,
            "consecutive_failures": self.consecutive_failures,
        }

    def document(self, status: str, gate: GateView, schedule: Schedule | None,
                 now_mono: float) -> dict[str, Any]:
        """The status document published in Redis (see README, "Status in Redis")."""
        result = self.last_result
        now_wall = self.wall()
        last_start = gate.last_start
        return {
            "srvid": self.srvid,
            "program": program_name(self.srvid),
            "alias": self.alias,
            "status": status,
            "pid": spawning.program_pid(),
            "host": self.host,
            "version": __version__,
            "frequency": self.server.frequency if self.server else None,
            "snapshot_in_progress": gate.in_progress,
            "force_pending": gate.force_pending,
            "last_snapshot_start": iso(
                now_wall - (now_mono - last_start) if last_start is not None else None
            ),
            "last_snapshot_duration": round(result.duration, 3) if result else None,
            "last_snapshot_outcome": (result.outcome if result else
                                      ("failed" if last_start is not None else None)),
            "last_snapshot_rows": sum(result.rows.values()) if result else None,
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_at),
            "snapshots_ok": self.snapshots_ok,
            "snapshots_failed": self.snapshots_failed,
            "consecutive_failures": self.consecutive_failures,
            "next_snapshot_due": iso(
                now_wall + max(0.0, schedule.next_due - now_mono) if schedule else None
            ),
            "started_at": iso(self.started_at),
        }


def result_fields(result: SnapshotResult) -> dict[str, Any]:
    """A snapshot's outcome as plugin events carry it."""
    return {
        "outcome": result.outcome,
        "duration": round(result.duration, 3),
        "rows": dict(result.rows),
        "errors": list(result.errors),
        "take_snapshot_errors": result.take_snapshot_errors,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
