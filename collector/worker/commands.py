"""What a worker answers to the control's commands (run in its command thread).

``force_snapshot`` goes through the gate (upstream's refusals) and wakes the
main loop; ``refresh_db_cat`` queues PoWA 5 catalogs for the next snapshot.
"""

from __future__ import annotations

from collections.abc import Callable

from collector.worker.databases import CatalogRefresh
from collector.worker.gate import ForceGate

#: how long a forced snapshot is waited for, to tell whether it already began
STARTED_WAIT = 0.1


class CommandHandler:
    def __init__(self, gate: ForceGate, refresh: CatalogRefresh,
                 wake: Callable[[], None]) -> None:
        self.gate = gate
        self.refresh = refresh
        self.wake = wake

    def __call__(self, command: str, args: tuple[str, ...] = ()) -> tuple[str, str]:
        if command == "refresh_db_cat":
            # no names: every database; the next snapshot (its own schedule) reads them
            self.refresh.request(args)
            return "OK", "Catalogs will be refreshed during the next snapshot"
        if command != "force_snapshot":
            return "UNKNOWN", f"unknown worker command {command[:40]!r}"
        refused = self.gate.request()
        if refused is not None:
            return "ERROR", refused
        self.wake()
        # like upstream: wait a moment to tell whether it already began
        if self.gate.wait_started(STARTED_WAIT):
            return "OK", "Snapshot in progress"
        return "OK", "Snapshot will begin shortly"
