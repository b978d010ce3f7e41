"""The start gate: slots taken, waited for, given up on, and who queues at all."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from collector import spawning
from collector.worker import startgate


def test_config_path_in_every_spelling() -> None:
    assert spawning.config_path(["-c", "/f/collector.cfg", "--srvid", "3"]) == "/f/collector.cfg"
    assert spawning.config_path(["--srvid", "3", "--config", "/f/c.cfg"]) == "/f/c.cfg"
    assert spawning.config_path(["--config=/f/c.cfg"]) == "/f/c.cfg"
    assert spawning.config_path(["-c/f/c.cfg"]) == "/f/c.cfg"
    assert spawning.config_path(["--srvid", "3"]) is None
    assert startgate.server_id(["-c", "x", "--srvid", "42"]) == 42
    assert startgate.server_id(["--srvid=7"]) == 7
    assert startgate.server_id(["--srvid", "nope"]) == 0


def test_only_supervised_workers_queue(tmp_path: Path) -> None:
    argv = ["-c", str(tmp_path / "collector.cfg"), "--srvid", "1"]
    assert startgate.wanted(argv, {}) is None
    assert startgate.wanted([*argv, "--once"], {"SUPERVISOR_ENABLED": "1"}) is None
    assert startgate.wanted(argv, {"SUPERVISOR_ENABLED": "1"}) == tmp_path / ".start"


def test_slots_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(startgate.ENV_SLOTS, "7")
    assert startgate.slots() == 7
    monkeypatch.setenv(startgate.ENV_SLOTS, "zero")
    assert startgate.slots() == len(os.sched_getaffinity(0))


def _occupy(directory: Path, slot: int) -> int:
    """Hold ``slot`` through another open file description (as another worker would)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(directory / f"slot_{slot}", os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_free_slot_is_taken_and_released(tmp_path: Path) -> None:
    gate = tmp_path / ".start"
    with startgate.held(gate, srvid=5, count=2) as taken:
        assert taken
        # slot 1 (5 % 2) is held: another taker of it must wait
        probe = os.open(gate / "slot_1", os.O_WRONLY)
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the slot was not held")
            except BlockingIOError:
                pass
        finally:
            os.close(probe)
    assert (gate.stat().st_mode & 0o777) == 0o700
    fd = _occupy(gate, 1)  # free again after the body
    os.close(fd)


def test_a_waiter_goes_in_when_the_holder_leaves(tmp_path: Path) -> None:
    gate = tmp_path / ".start"
    fd = _occupy(gate, 0)
    threading.Timer(0.5, os.close, (fd,)).start()
    started = time.monotonic()
    with startgate.held(gate, srvid=4, count=2, max_wait=10) as taken:
        waited = time.monotonic() - started
    assert taken
    assert waited >= 0.4


def test_a_waiter_gives_up_and_starts_anyway(tmp_path: Path) -> None:
    gate = tmp_path / ".start"
    fd = _occupy(gate, 0)
    try:
        with startgate.held(gate, srvid=3, count=1, max_wait=1) as taken:
            assert not taken
    finally:
        os.close(fd)


def test_an_unusable_directory_opens_the_gate(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with startgate.held(blocker / ".start", srvid=1) as taken:
        assert not taken
    with startgate.held(None, srvid=1) as taken:
        assert not taken


def test_only_a_supervised_worker_is_made_nicer(tmp_path: Path) -> None:
    # twice, as a stand-in that found no spawner and then runs its worker does
    code = ("import os, sys; from collector.worker import startgate;"
            " startgate.be_nice(startgate.wanted(sys.argv[1:], os.environ));"
            " startgate.be_nice(startgate.wanted(sys.argv[1:], os.environ));"
            " print(os.nice(0))")
    argv = [sys.executable, "-c", code, "-c", str(tmp_path / "collector.cfg")]
    base = os.nice(0)
    plain = subprocess.run(argv, capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "SUPERVISOR_ENABLED"})
    supervised = subprocess.run(argv, capture_output=True, text=True, check=True,
                                env={**os.environ, "SUPERVISOR_ENABLED": "1"})
    assert int(plain.stdout) == base
    assert int(supervised.stdout) == max(base, spawning.NICE)
