"""Admission of NOTIFY requests: cached permissions, privileged first, floods dropped."""

from __future__ import annotations

from collector.control.admission import REFUSAL_EVERY, REFUSALS, TTL, Admission, Incoming


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_privileged_first_each_request_once_permission_cached() -> None:
    asked: list[int] = []

    def check(pid: int) -> bool:
        asked.append(pid)
        return pid == 7

    clock = Clock()
    admission = Admission(check, clock)
    flood = [Incoming(9, f"WORKERS_STATUS r{i % 3}") for i in range(5000)]
    batch = [*flood[:2500], Incoming(7, "WORKERS_STATUS web"), *flood[2500:],
             Incoming(7, "WORKERS_STATUS web")]
    privileged, refused = admission.sort(batch)
    assert privileged == [Incoming(7, "WORKERS_STATUS web")]
    assert refused == [Incoming(9, "WORKERS_STATUS r0"), Incoming(9, "WORKERS_STATUS r1"),
                       Incoming(9, "WORKERS_STATUS r2")]
    assert sorted(asked) == [7, 9]
    clock.now += TTL
    admission.sort([Incoming(9, "x")])
    assert sorted(asked) == [7, 9, 9]


def test_a_refused_backend_is_answered_a_few_times_a_second_the_rest_dropped() -> None:
    clock = Clock()
    admission = Admission(lambda pid: False, clock)
    assert [admission.answer_refusal(9) for _ in range(REFUSALS + 2)] == [True] * REFUSALS + [
        False, False]
    # another backend has its own allowance
    assert admission.answer_refusal(10)
    clock.now += REFUSAL_EVERY
    assert admission.answer_refusal(9)
    assert admission.dropped == 2


def test_a_request_whose_sender_is_gone_is_dropped_and_never_cached() -> None:
    gone = {9}
    asked: list[int] = []

    def check(pid: int) -> bool | None:
        asked.append(pid)
        return None if pid in gone else True

    admission = Admission(check, Clock())
    privileged, refused = admission.sort([Incoming(9, "WORKERS_STATUS r1"),
                                          Incoming(7, "WORKERS_STATUS r2")])
    assert privileged == [Incoming(7, "WORKERS_STATUS r2")]
    assert refused == []
    assert admission.orphans == 1
    # a new backend may take the pid at once: it is asked about, not dropped
    gone.clear()
    privileged, _ = admission.sort([Incoming(9, "WORKERS_STATUS r3")])
    assert privileged == [Incoming(9, "WORKERS_STATUS r3")]
    assert asked == [9, 7, 9]
