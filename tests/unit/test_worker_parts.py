"""The worker's parts on their own: the force gate, the bookkeeping, the watchdog's decisions."""

from __future__ import annotations

import signal
from typing import Any, cast

import pytest

from collector.wakeup import SignalFlags, Wakeup
from collector.worker.gate import ForceGate
from collector.worker.remote import RemoteSession
from collector.worker.schedule import Schedule
from collector.worker.snapshot import SnapshotResult
from collector.worker.state import ServerState
from collector.worker.watchdog import Watchdog
from tests.unit.fakes import FakeRemote


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_force_gate_refuses_like_upstream_and_honours_the_ten_seconds() -> None:
    clock = Clock()
    gate = ForceGate(clock)
    assert gate.request() is None
    assert gate.pending
    assert gate.request() == "A forced snapshot is already scheduled"
    gate.begin()
    assert not gate.pending
    assert gate.wait_started(0)
    assert gate.request() == "A snapshot is already in progress"
    gate.end()
    clock.now += 9.9
    assert gate.request() == "Last snapshot was less than 10s. ago"
    clock.now += 0.2
    assert gate.request() is None
    view = gate.view()
    assert (view.in_progress, view.force_pending, view.last_start) == (False, True, 1000.0)


def test_a_queued_force_that_has_not_begun_is_not_started() -> None:
    gate = ForceGate(Clock())
    assert gate.request() is None
    assert not gate.wait_started(0.01)


def result(outcome: str, errors: list[str] | None = None) -> SnapshotResult:
    done = SnapshotResult(srvid=1, started_at=0.0, duration=0.5, rows={"pg_stat_statements": 7},
                          errors=errors or [], committed=outcome != "failed",
                          failed=outcome == "failed")
    assert done.outcome == outcome
    return done


def test_state_counts_outcomes_and_keeps_only_current_errors() -> None:
    state = ServerState(1, wall=lambda: 1_700_000_000.0)
    assert state.error("remote down")
    assert not state.error("remote down")
    assert state.account(result("ok")) == []
    assert (state.snapshots_ok, state.snapshots_failed, state.last_error) == (1, 0, None)
    assert state.account(None) == []
    assert state.account(result("failed", ["version mismatch"])) == ["version mismatch"]
    assert (state.snapshots_failed, state.consecutive_failures) == (2, 2)
    assert state.last_error == "version mismatch"
    # stored, with an error of one source: counted good, the error stays current
    assert state.account(result("errors", ["pg_qualstats: boom"])) == ["pg_qualstats: boom"]
    assert (state.snapshots_ok, state.consecutive_failures) == (2, 0)
    assert state.last_error == "pg_qualstats: boom"


def test_status_document_tells_the_schedule_in_wall_time() -> None:
    state = ServerState(7, wall=lambda: 1_700_000_000.0)
    gate = ForceGate(Clock(500.0))
    gate.begin()
    schedule = Schedule(frequency=300, next_due=560.0)
    document = state.document("running", gate.view(), schedule, now_mono=510.0)
    assert document["program"] == "worker_7"
    assert document["snapshot_in_progress"] is True
    assert document["last_snapshot_start"] == "2023-11-14T22:13:10.000+00:00"
    assert document["next_snapshot_due"] == "2023-11-14T22:14:10.000+00:00"
    assert "password" not in " ".join(document)


def armed(dog: Watchdog, remote_deadline: float, repo_deadline: float) -> FakeRemote:
    """A snapshot under way: its remote phase must end by ``remote_deadline``."""
    remote = FakeRemote()
    dog.arm(cast(RemoteSession, remote), repo_deadline=repo_deadline)
    dog.remote_begin(deadline=remote_deadline)
    return remote


@pytest.fixture
def watchdog() -> Any:
    wakeup = Wakeup()
    flags = SignalFlags(wakeup)
    stops: list[bool] = []
    dog = Watchdog(flags, grace=30.0, on_stop=lambda: stops.append(True))
    yield dog, flags, stops
    wakeup.close()


def test_watchdog_cancels_an_overrun_then_drops_a_frozen_remote(watchdog: Any) -> None:
    dog, _, _ = watchdog
    remote = armed(dog, remote_deadline=100.0, repo_deadline=10_000.0)
    dog.check(99.0)
    assert remote.calls == []
    dog.check(100.0)
    assert remote.calls == ["cancel"]
    dog.check(102.0)
    assert remote.calls == ["cancel"]
    # the same statement still runs ABORT_AFTER seconds later: the socket is shut
    dog.check(100.0 + Watchdog.ABORT_AFTER)
    assert remote.calls == ["cancel", "abort"]
    assert not dog.cancelled()


def test_watchdog_spares_a_remote_that_moved_on_after_the_cancel(watchdog: Any) -> None:
    dog, _, _ = watchdog
    remote = armed(dog, remote_deadline=100.0, repo_deadline=10_000.0)
    dog.check(100.0)
    dog.remote_statement()
    dog.check(200.0)
    assert remote.calls == ["cancel"]


def test_watchdog_gives_a_stop_its_grace_then_cancels(watchdog: Any) -> None:
    dog, flags, stops = watchdog
    remote = armed(dog, remote_deadline=1e12, repo_deadline=1e12)
    flags.handle(signal.SIGTERM)
    started = flags.stop_requested_at
    dog.check(started + 1.0)
    assert stops == [True]
    assert remote.calls == []
    dog.check(started + 30.0)
    assert remote.calls == ["cancel"]
    assert dog.cancelled()


def test_watchdog_a_second_stop_cancels_at_once(watchdog: Any) -> None:
    dog, flags, _ = watchdog
    remote = armed(dog, remote_deadline=1e12, repo_deadline=1e12)
    flags.handle(signal.SIGTERM)
    flags.handle(signal.SIGTERM)
    dog.check(flags.stop_requested_at + 0.1)
    assert remote.calls == ["cancel"]
    assert dog.cancelled()


def test_watchdog_does_nothing_when_disarmed(watchdog: Any) -> None:
    dog, flags, _ = watchdog
    remote = armed(dog, remote_deadline=10.0, repo_deadline=50.0)
    dog.disarm()
    flags.handle(signal.SIGTERM)
    dog.check(10_000.0)
    assert remote.calls == []
