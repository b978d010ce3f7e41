"""Which worker programs the event listener starts (collector.fleet.starter)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from collector.fleet.starter import Starter, due, never_started
from collector.keys import program_name, worker_id
from tests.helpers import wait_for


def info(state: str, start: int = 0) -> dict[str, Any]:
    return {"statename": state, "start": start}


def test_worker_id_reads_only_worker_program_names() -> None:
    assert worker_id(program_name(42)) == 42
    for name in ("control", "programs", "spawner", "worker_", "worker_0", "worker_01",
                 "worker_1a", "worker_²", "worker_-1", "xworker_1"):
        assert worker_id(name) is None, name


def test_only_a_worker_supervisord_never_started_is_due() -> None:
    assert never_started("worker_1", info("STOPPED"))
    # started then stopped (an operator's supervisorctl stop): left alone
    assert not never_started("worker_1", info("STOPPED", start=1_700_000_000))
    for state in ("STARTING", "RUNNING", "BACKOFF", "FATAL", "EXITED", "STOPPING"):
        assert not never_started("worker_1", info(state)), state
    assert not never_started("control", info("STOPPED"))


def test_due_lists_lowest_server_ids_first() -> None:
    processes = {
        "worker_10": info("STOPPED"),
        "worker_9": info("STOPPED"),
        "worker_2": info("RUNNING", start=5),
        "worker_100": info("STOPPED"),
        "metrics": info("STOPPED"),
    }
    assert due(processes) == ["worker_9", "worker_10", "worker_100"]


class FakeSupervisor:
    """supervisord's table and its startProcess, recorded with the time of each multicall."""

    def __init__(self, count: int) -> None:
        self.processes = {f"worker_{n}": info("STOPPED") for n in range(1, count + 1)}
        self.calls: list[tuple[float, list[str]]] = []

    def all_processes(self) -> dict[str, dict[str, Any]]:
        return {name: dict(value) for name, value in self.processes.items()}

    def multicall(self, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        names = [str(params[0]) for _, params in calls]
        self.calls.append((time.monotonic(), names))
        for name in names:
            self.processes[name] = info("STARTING", start=1)
        return [True] * len(names)


def test_the_starter_keeps_its_pace_and_its_window() -> None:
    fake = FakeSupervisor(12)
    # 8 a second: 2 every 0.25 s, at most 40 starting at once
    starter = Starter(None, 8, connect=lambda: fake)  # type: ignore[arg-type,return-value]
    assert (starter.step, starter.window) == (2, 40)
    starter.start()
    starter.wake()
    try:
        wait_for(lambda: starter.started == 12, 10, "all started")
    finally:
        starter.close()
    assert [names for _, names in fake.calls] == [
        [f"worker_{n}", f"worker_{n + 1}"] for n in range(1, 13, 2)]
    times = [at for at, _ in fake.calls]
    assert all(later - earlier >= 0.2 for earlier, later in itertools.pairwise(times)), times


def test_a_full_window_waits_for_programs_to_leave_starting() -> None:
    fake = FakeSupervisor(6)
    starter = Starter(None, 1, connect=lambda: fake)  # type: ignore[arg-type,return-value]
    starter.window = 2
    starter.interval = 0.01
    starter.start()
    starter.wake()
    try:
        wait_for(lambda: starter.started == 2, 5, "the first two")
        time.sleep(0.3)
        assert starter.started == 2
        starter.seen("worker_1", "STARTING")
        time.sleep(0.1)
        assert starter.started == 2
        starter.seen("worker_1", "RUNNING")
        wait_for(lambda: starter.started == 3, 5, "one more once worker_1 runs")
        starter.seen("worker_2", "BACKOFF")
        starter.seen("worker_3", "RUNNING")
        wait_for(lambda: starter.started == 5, 5, "two more")
    finally:
        starter.close()
