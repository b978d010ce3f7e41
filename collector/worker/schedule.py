"""Schedule maths of a worker: when the next snapshot is due.

Pure logic on monotonic seconds, with the clock and random source injected,
so that tests can check it without waiting.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Fixed cadence: snapshots start every ``frequency`` seconds of the monotonic clock."""

    frequency: float
    next_due: float
    #: monotonic start of the last snapshot, None before the first
    last_start: float | None = None

    @classmethod
    def resume(
        cls,
        frequency: float,
        last_snapshot: float | None,
        now_wall: float,
        now_mono: float,
        rng: random.Random,
    ) -> Schedule:
        """First due time after a (re)start.

        ``last_snapshot`` is the server's ``snapts`` (epoch seconds).  If it is
        inside the last period, keep the cadence it implies; if it is older,
        start at a random point of the next half period (a server whose
        collector was lost gets its next snapshot within two periods of its
        last); if it is unknown, at a random point of the period, so that a
        fleet that starts together does not snapshot in step.
        """
        if last_snapshot is not None:
            age = now_wall - last_snapshot
            if age < frequency:
                # a snapts in the future (clocks apart) counts as "just now"
                return cls(frequency, now_mono + frequency - max(age, 0.0))
            # overdue (a host lost, a fleet down for a while): within half a period,
            # so that the gap stays under two periods, still spread
            return cls(frequency, now_mono + rng.uniform(0, frequency / 2))
        return cls(frequency, now_mono + rng.uniform(0, frequency))

    def due(self, now_mono: float) -> bool:
        return now_mono >= self.next_due

    def started(self, now_mono: float, forced: bool) -> None:
        """A snapshot starts now: set the next slot.

        A forced snapshot restarts the cadence from now, as upstream does.
        Otherwise the next slot is one period after the one just due; slots
        already in the past are skipped (and counted) rather than run in a burst.
        """
        self.last_start = now_mono
        if forced and not self.due(now_mono):
            self.next_due = now_mono + self.frequency
            return
        self.next_due += self.frequency
        if self.next_due <= now_mono:
            missed = int((now_mono - self.next_due) // self.frequency) + 1
            self.next_due += missed * self.frequency
            log.warning(
                "snapshot overran its period of %ss: %d slot(s) skipped", self.frequency, missed
            )

    def retry(self, now_mono: float, delay: float) -> None:
        """Try again within ``delay`` seconds (at most a quarter of the period)."""
        self.next_due = min(self.next_due, now_mono + min(delay, self.frequency / 4))

    def change_frequency(self, frequency: float, now_mono: float) -> None:
        """Adopt a new frequency at once, counting from the last snapshot."""
        if frequency == self.frequency:
            return
        base = self.last_start if self.last_start is not None else now_mono
        self.frequency = frequency
        self.next_due = max(now_mono, base + frequency)
