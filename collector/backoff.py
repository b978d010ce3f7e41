"""Exponential backoff with jitter, for every reconnection and retry of the fleet.

Pure logic with the random source injected; used by the worker, the control,
the event listener and the plugins alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff with jitter, for reconnection attempts."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    _current: float = 0.0

    def next_delay(self) -> float:
        self._current = (
            self.initial if self._current == 0 else min(self._current * self.factor, self.maximum)
        )
        return self._current * (1 + self.rng.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0

    @property
    def active(self) -> bool:
        return self._current > 0
