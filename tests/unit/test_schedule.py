"""Schedule maths: resume from snapts, spread, fixed cadence, backoff."""

from __future__ import annotations

import random

from collector.backoff import Backoff
from collector.worker.schedule import Schedule


def test_resume_keeps_the_cadence_of_a_recent_snapshot() -> None:
    schedule = Schedule.resume(300, last_snapshot=1000.0, now_wall=1100.0, now_mono=50.0,
                               rng=random.Random(1))
    assert schedule.next_due == 50.0 + 200.0


def test_unknown_or_overdue_snapshot_starts_at_a_random_point() -> None:
    rng = random.Random(7)
    starts = [
        Schedule.resume(300, last_snapshot=None, now_wall=0, now_mono=0, rng=rng).next_due
        for _ in range(200)
    ]
    assert all(0 <= s <= 300 for s in starts)
    # spread over the period, not in step
    assert max(starts) - min(starts) > 200
    # overdue: within half a period (a server taken over from a lost host must not
    # wait a whole random period more: its gap stays under two periods)
    overdue = [Schedule.resume(300, last_snapshot=0.0, now_wall=10_000, now_mono=5,
                               rng=rng).next_due for _ in range(200)]
    assert all(5 <= s <= 155 for s in overdue)
    assert max(overdue) - min(overdue) > 100


def test_snapts_in_the_future_counts_as_just_taken() -> None:
    schedule = Schedule.resume(60, last_snapshot=2000.0, now_wall=1990.0, now_mono=0,
                               rng=random.Random())
    assert schedule.next_due == 60


def test_fixed_cadence_and_skipped_slots() -> None:
    schedule = Schedule(10, next_due=100)
    assert not schedule.due(99.9)
    assert schedule.due(100)
    schedule.started(100.5, forced=False)
    assert schedule.next_due == 110
    # a snapshot that overran three periods: the missed slots are skipped, not run in a burst
    schedule.started(110.2, forced=False)
    assert schedule.next_due == 120
    schedule.started(145, forced=False)
    assert schedule.next_due == 150


def test_forced_snapshot_restarts_the_cadence() -> None:
    schedule = Schedule(10, next_due=100)
    schedule.started(95, forced=True)
    assert schedule.next_due == 105


def test_new_frequency_counts_from_the_last_snapshot() -> None:
    schedule = Schedule(300, next_due=400)
    schedule.started(400, forced=False)
    schedule.change_frequency(60, now_mono=420)
    assert schedule.next_due == 460
    schedule.change_frequency(5, now_mono=430)
    assert schedule.next_due == 430


def test_backoff_grows_with_jitter_up_to_a_maximum() -> None:
    backoff = Backoff(initial=1, factor=2, maximum=8, jitter=0.1, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.9 <= delay <= base * 1.1
    assert backoff.active
    backoff.reset()
    assert not backoff.active
    assert 0.9 <= backoff.next_delay() <= 1.1
