"""What the control remembers of the rows its workers run with, across reloads."""

from __future__ import annotations

from collector.control.reload import told


def test_a_changed_row_is_known_once_its_worker_was_reached() -> None:
    previous = {1: "a", 2: "b", 3: "c"}
    current = {1: "a", 2: "B", 3: "C", 4: "d"}
    assert told(previous, current, [2]) == {1: "a", 2: "B", 3: "c", 4: "d"}


def test_an_unreached_change_is_seen_again_by_the_next_reload() -> None:
    first = told({1: "a"}, {1: "b"}, [])
    assert first == {1: "a"}
    # the next reload compares with "a" again, and this time reaches the worker
    assert told(first, {1: "b"}, [1]) == {1: "b"}


def test_servers_gone_from_powa_servers_are_forgotten() -> None:
    assert told({1: "a", 2: "b"}, {1: "a"}, []) == {1: "a"}
