"""The watchdog sleeps until its nearest deadline, and wakes when an earlier one is set.

A snapshot should cost its thread a wake-up or two, not one every fraction
of a second; and no deadline may be missed for it (the decisions themselves
are tested in test_worker_parts.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from collector.wakeup import SignalFlags, Wakeup
from collector.worker.remote import RemoteSession
from collector.worker.watchdog import Watchdog
from tests.unit.fakes import FakeRemote


@pytest.fixture
def dog() -> Iterator[Watchdog]:
    flags = SignalFlags(Wakeup())
    watchdog = Watchdog(flags, grace=30.0)
    yield watchdog
    flags.wakeup.close()


def next_check(dog: Watchdog, now: float) -> float:
    with dog._lock:
        return dog.next_check(now)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_with_nothing_to_watch_it_sleeps_long(dog: Watchdog) -> None:
    assert next_check(dog, 100.0) == 100.0 + Watchdog.IDLE_WAKE
    dog.arm(cast(RemoteSession, FakeRemote()), repo_deadline=150.0)
    # armed, nothing watched yet: remote_begin() and watch_repository() say when
    assert next_check(dog, 100.0) == 100.0 + Watchdog.IDLE_WAKE


def test_it_wakes_at_the_remote_deadline_then_for_the_abort(dog: Watchdog) -> None:
    remote = FakeRemote()
    dog.arm(cast(RemoteSession, remote), repo_deadline=500.0)
    dog.watch_repository(cast(Any, object()))
    assert next_check(dog, 100.0) == 500.0
    dog.remote_begin(deadline=160.0)
    assert next_check(dog, 100.0) == 160.0
    dog.check(160.0)
    assert remote.calls == ["cancel"]
    assert next_check(dog, 160.0) == 160.0 + Watchdog.ABORT_AFTER
    # the remote moved on: nothing more to do for it, the repository's deadline is next
    dog.remote_statement()
    assert next_check(dog, 161.0) == 500.0
    dog.disarm()
    assert next_check(dog, 161.0) == 161.0 + Watchdog.IDLE_WAKE


def test_after_a_snapshot_it_sleeps_until_the_next_ones_earliest_deadline(
    dog: Watchdog,
) -> None:
    """Arming the next scheduled snapshot, whose deadlines come no earlier, plans no
    earlier wake-up (it would cost one); an earlier deadline (a forced snapshot) does."""
    margin = Watchdog.QUIET_MARGIN
    dog.disarm(quiet_until=200.0)
    assert next_check(dog, 100.0) == 200.0 - margin
    dog.arm(cast(RemoteSession, FakeRemote()), repo_deadline=400.0)
    dog.watch_repository(cast(Any, object()))
    dog.remote_begin(deadline=201.0)
    assert next_check(dog, 150.0) == 200.0 - margin
    # awake then: the snapshot still runs, its own deadline is next
    assert next_check(dog, 200.0 - margin) == 201.0
    dog.disarm(quiet_until=300.0)
    dog.arm(cast(RemoteSession, FakeRemote()), repo_deadline=400.0)
    dog.remote_begin(deadline=220.0)
    assert next_check(dog, 210.0) == 220.0
    dog.disarm()
    assert next_check(dog, 230.0) == 230.0 + Watchdog.IDLE_WAKE


def test_a_stop_brings_the_wake_up_to_the_end_of_its_grace(dog: Watchdog) -> None:
    dog.arm(cast(RemoteSession, FakeRemote()), repo_deadline=1e12)
    dog.remote_begin(deadline=1e12)
    dog.flags.handle(signal.SIGTERM)
    started = dog.flags.stop_requested_at
    assert started is not None
    # the stop is told at once (on_stop), its cancel is due when the grace ends
    assert next_check(dog, started) == started
    dog.check(started)
    assert next_check(dog, started + 1.0) == started + dog.grace
    dog.flags.handle(signal.SIGTERM)
    assert next_check(dog, started + 2.0) == started + 2.0


def running(dog: Watchdog) -> Watchdog:
    dog.start()
    assert wait_for(lambda: dog._planned > 0.0)
    return dog


def test_an_earlier_deadline_wakes_the_sleeping_thread(dog: Watchdog) -> None:
    running(dog)
    try:
        remote = FakeRemote()
        dog.arm(cast(RemoteSession, remote), repo_deadline=time.monotonic() + 3600)
        dog.remote_begin(deadline=time.monotonic() + 0.2)
        assert wait_for(lambda: remote.calls == ["cancel"]), (
            "the thread slept through a deadline set after it went to sleep")
    finally:
        dog.close()
        dog.join(5)


def test_a_stop_during_a_snapshot_cancels_it_after_the_grace() -> None:
    flags = SignalFlags(Wakeup())
    stops: list[bool] = []
    dog = running(Watchdog(flags, grace=1, on_stop=lambda: stops.append(True)))
    try:
        remote = FakeRemote()
        dog.arm(cast(RemoteSession, remote), repo_deadline=time.monotonic() + 3600)
        dog.remote_begin(deadline=time.monotonic() + 3600)
        flags.handle(signal.SIGTERM)
        assert wait_for(lambda: stops == [True])
        assert wait_for(lambda: remote.calls == ["cancel"])
        assert dog.cancelled()
    finally:
        dog.close()
        dog.join(5)
        flags.wakeup.close()
