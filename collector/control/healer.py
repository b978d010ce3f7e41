"""Self-healing: programs supervisord gave up on are started again, with a backoff.

supervisord marks a program FATAL when it dies within ``startsecs`` three
times in a row (a ``collector.cfg`` missing for a moment during a deploy, a
remote that kills connections at start, a configuration error being fixed)
and then leaves it alone for good.  The control looks at the programs of the
fleet now and then and starts each FATAL one again after a delay that
doubles with each attempt (``FIRST_DELAY`` up to ``MAX_DELAY``), so a
transient cause never needs an operator and a permanent one costs one
attempt every ten minutes, each logged.  A program that has been RUNNING
again for a while gets its first delay back.  Programs that exited on
purpose (EXITED with an expected code: unknown server, frequency -1) or
that an operator stopped (STOPPED) are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("collector.control")

FIRST_DELAY = 30.0
MAX_DELAY = 600.0
#: running this long again means the cause is gone: the next failure starts over
HEALED_AFTER = 300.0


@dataclass
class _Patient:
    delay: float
    next_attempt: float
    attempts: int = 0


class Healer:
    def __init__(self, first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.patients: dict[str, _Patient] = {}

    def due(self, processes: Mapping[str, Mapping[str, Any]], now: float) -> list[str]:
        """Programs to start again now, from supervisord's process table (by name)."""
        starting: list[str] = []
        for name, info in processes.items():
            state = str(info.get("statename"))
            patient = self.patients.get(name)
            if state == "FATAL":
                if patient is None:
                    patient = self.patients[name] = _Patient(self.first_delay,
                                                             now + self.first_delay)
                    log.warning("%s is FATAL (it died at start): starting it again in %.0fs",
                                name, patient.delay)
                elif now >= patient.next_attempt:
                    patient.attempts += 1
                    starting.append(name)
                    patient.delay = min(patient.delay * 2, self.max_delay)
                    patient.next_attempt = now + patient.delay
            elif patient is not None and state == "RUNNING" \
                    and now - float(info.get("start") or now) >= HEALED_AFTER:
                del self.patients[name]
        for name in set(self.patients) - set(processes):
            del self.patients[name]
        return starting

    def attempts(self, name: str) -> int:
        patient = self.patients.get(name)
        return patient.attempts if patient else 0
