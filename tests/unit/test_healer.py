"""The healer's decisions: FATAL programs started again with a doubling delay."""

from __future__ import annotations

from collector.control.healer import HEALED_AFTER, Healer


def table(**states: str) -> dict[str, dict[str, object]]:
    return {name: {"statename": state, "start": 0.0} for name, state in states.items()}


def test_a_fatal_program_is_started_again_later_and_later() -> None:
    healer = Healer(first_delay=30, max_delay=100)
    fatal = table(worker_1="FATAL", worker_2="RUNNING", worker_3="STOPPED", worker_4="EXITED")
    assert healer.due(fatal, 0.0) == []
    assert healer.due(fatal, 29.0) == []
    assert healer.due(fatal, 30.0) == ["worker_1"]
    assert healer.attempts("worker_1") == 1
    assert healer.due(fatal, 31.0) == []
    assert healer.due(fatal, 90.0) == ["worker_1"]
    # capped: the third attempt 100 s after the second, not 120
    assert healer.due(fatal, 189.0) == []
    assert healer.due(fatal, 190.0) == ["worker_1"]


def test_a_program_running_again_for_long_starts_over() -> None:
    healer = Healer(first_delay=10)
    healer.due(table(worker_1="FATAL"), 0.0)
    assert healer.due(table(worker_1="FATAL"), 10.0) == ["worker_1"]
    running = {"worker_1": {"statename": "RUNNING", "start": 11.0}}
    healer.due(running, 11.0 + HEALED_AFTER)
    assert healer.attempts("worker_1") == 0
    assert healer.due(table(worker_1="FATAL"), 400.0) == []
    assert healer.due(table(worker_1="FATAL"), 410.0) == ["worker_1"]


def test_removed_programs_are_forgotten() -> None:
    healer = Healer(first_delay=10)
    healer.due(table(worker_1="FATAL"), 0.0)
    healer.due({}, 1.0)
    assert healer.patients == {}
