"""Which worker programs the event listener starts (collector.fleet.starter)."""

from __future__ import annotations

from typing import Any

from collector.fleet.starter import due, never_started
from collector.keys import program_name, worker_id


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
