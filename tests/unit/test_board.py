"""How a server's status is derived from its program state and its Redis status."""

from __future__ import annotations

import os
from pathlib import Path

import redis

from collector import config
from collector.control.board import DISABLED, STARTING, STUCK, StatusBoard, derive_status
from collector.fleet import files
from collector.fleet.programs import state_from_event
from tests.unit.test_config import GOOD, write

RUNNING = {"statename": "RUNNING", "pid": 10, "start": 1000}


def test_disabled_and_unknown_programs() -> None:
    assert derive_status(False, RUNNING, None, 2000, 30) == DISABLED
    assert "apply pending" in derive_status(True, None, None, 2000, 30)


def test_running_worker_speaks_for_itself() -> None:
    document = {"pid": 10, "status": "no connection to remote server"}
    assert derive_status(True, RUNNING, document, 2000, 30) == "no connection to remote server"


def test_expired_key_of_a_running_program_means_stuck() -> None:
    assert derive_status(True, RUNNING, None, 2000, 30) == STUCK
    # a key written by an older process of that program does not count
    assert derive_status(True, RUNNING, {"pid": 9, "status": "running"}, 2000, 30) == STUCK
    # unless the program just started and has not written yet
    assert derive_status(True, RUNNING, None, 1010, 30) == STARTING


def test_a_worker_younger_than_startsecs_already_reports() -> None:
    starting = {"statename": "STARTING", "pid": 10}
    assert derive_status(True, starting, {"pid": 10, "status": "running"}, 0, 30) == "running"
    assert derive_status(True, starting, None, 0, 30) == STARTING


def test_program_states() -> None:
    for state, expected in [("STOPPED", "stopped"), ("EXITED", "stopped"),
                            ("STOPPING", "stopping"), ("STARTING", STARTING)]:
        assert derive_status(True, {"statename": state}, None, 0, 30) == expected
    assert "FATAL" in derive_status(True, {"statename": "FATAL"}, None, 0, 30)
    assert "BACKOFF" in derive_status(True, {"statename": "BACKOFF"}, None, 0, 30)


def test_program_state_events() -> None:
    headers = {"processname": "worker_3", "groupname": "worker_3", "from_state": "STARTING",
               "pid": "4242"}
    name, state = state_from_event("PROCESS_STATE_RUNNING", headers)  # type: ignore[misc]
    assert name == "worker_3"
    assert state["state"] == "RUNNING"
    assert state["pid"] == 4242
    stopped = state_from_event("PROCESS_STATE_FATAL", {"processname": "worker_3"})
    assert stopped is not None and stopped[1]["state"] == "FATAL" and stopped[1]["pid"] == 0
    assert state_from_event("TICK_5", {"when": "1"}) is None


def test_the_enabled_servers_are_never_cached_from_a_listing_taken_mid_change(
    tmp_path: Path,
) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    files.prepare_directories(cfg)
    board = StatusBoard(cfg, redis.Redis())
    files.write_atomic(files.worker_file(cfg, 1), "[program:worker_1]\n")
    files.set_enabled(cfg, 1, enable=True)
    assert board.servers() == (frozenset({1}), frozenset({1}))
    # a second link within the same clock tick: the directory's mtime does not move
    stamp = cfg.workers_enabled.stat().st_mtime_ns
    files.write_atomic(files.worker_file(cfg, 2), "[program:worker_2]\n")
    files.set_enabled(cfg, 2, enable=True)
    os.utime(cfg.workers_enabled, ns=(stamp, stamp))
    os.utime(cfg.workers_available, ns=(stamp, stamp))
    assert board.servers() == (frozenset({1, 2}), frozenset({1, 2}))
