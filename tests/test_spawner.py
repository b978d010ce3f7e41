"""The spawner: workers forked by one process, each stood for by the program supervisord runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector import spawning
from tests.conftest import Supervisord
from tests.helpers import (
    PYTHON,
    ROOT,
    Fleet,
    Repo,
    child_pids,
    is_alive,
    proc_text,
    stop_process,
    wait_for,
)


def start_spawner(fleet: Fleet) -> subprocess.Popen[bytes]:
    out = (fleet.directory / "spawner.log").open("ab")
    process = subprocess.Popen(
        [PYTHON, "-m", "collector.worker.spawner", "-c", str(fleet.cfg_path)],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    out.close()
    fleet.processes.append(process)
    wait_for(lambda: "forking workers" in spawner_log(fleet) or process.poll() is not None,
             30, "the spawner listening")
    assert process.poll() is None, spawner_log(fleet)
    return process


def spawner_log(fleet: Fleet) -> str:
    path = fleet.directory / "spawner.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def spawner(fleet: Fleet) -> Iterator[subprocess.Popen[bytes]]:
    process = start_spawner(fleet)
    yield process
    stop_process(process)


def forked_worker(spawner_pid: int, srvid: int) -> int | None:
    """The spawner's child collecting server ``srvid`` (named after its program), if any."""
    for pid in child_pids(spawner_pid):
        try:
            if proc_text(pid, "comm").strip() == f"worker_{srvid}":
                return pid
        except FileNotFoundError:
            continue
    return None


def test_once_is_forked_and_answers_through_its_stand_in(
    fleet: Fleet, repo: Repo, spawner: subprocess.Popen[bytes]
) -> None:
    before = repo.snapshots(1)
    once = fleet.once(1)
    assert once.returncode == 0, once.stderr
    assert once.stdout.startswith("worker_1: snapshot stored in")
    assert repo.snapshots(1) == before + 1
    # the worker's exit code and its stderr come back through the stand-in
    unknown = fleet.once(9999)
    assert unknown.returncode == 3
    assert "worker_9999:" in unknown.stderr
    assert spawner.poll() is None


def test_forked_worker_publishes_as_its_program_and_stops_with_it(
    fleet: Fleet, repo: Repo, spawner: subprocess.Popen[bytes]
) -> None:
    repo.due_in(2, 1, frequency=5)
    stub = fleet.start_worker(2)
    wait_for(lambda: forked_worker(spawner.pid, 2) is not None, 15, "a forked worker")
    worker = forked_worker(spawner.pid, 2)
    assert worker is not None and worker != stub.pid
    # the status names the pid supervisord would show: the stand-in's
    wait_for(lambda: (fleet.status(2) or {}).get("status") == "running", 20, "running")
    assert (fleet.status(2) or {})["pid"] == stub.pid
    wait_for(lambda: repo.snapshots(2) >= 1, 30, "a snapshot by the forked worker")
    # SIGTERM to the stand-in reaches the worker, which stops cleanly: exit 0 comes back
    stub.send_signal(signal.SIGTERM)
    assert stub.wait(30) == 0
    wait_for(lambda: not is_alive(worker), 10, "the worker gone")
    assert (fleet.status(2) or {}).get("status") in (None, "stopped")
    assert "stopped" in fleet.log(2)


def test_worker_dies_with_its_stand_in_and_outlives_the_spawner(
    fleet: Fleet, repo: Repo, spawner: subprocess.Popen[bytes]
) -> None:
    first, second = fleet.start_worker(1), fleet.start_worker(3)
    wait_for(lambda: None not in (forked_worker(spawner.pid, 1), forked_worker(spawner.pid, 3)),
             15, "two workers")
    killed = forked_worker(spawner.pid, 1)
    kept = forked_worker(spawner.pid, 3)
    assert killed is not None and kept is not None
    # supervisord's SIGKILL after stopwaitsecs hits the stand-in only: the worker follows
    first.kill()
    first.wait(10)
    wait_for(lambda: not is_alive(killed), 10, "the worker of a killed stand-in gone")
    # the spawner's end leaves running workers alone
    stop_process(spawner)
    assert not Path(fleet.directory / spawning.SOCKET_NAME).exists()
    wait_for(lambda: (fleet.status(3) or {}).get("status") == "running", 20, "running")
    assert is_alive(kept) and second.poll() is None
    # without a spawner, a worker imports and runs in its own process, as before
    alone = fleet.start_worker(1)
    wait_for(lambda: (fleet.status(1) or {}).get("pid") == alone.pid, 30, "the worker alone")
    assert child_pids(alone.pid) == []
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    wait_for(lambda: not is_alive(kept), 10, "the forked worker stopped")


def test_bad_requests_are_refused_and_lose_nothing(
    fleet: Fleet, repo: Repo, spawner: subprocess.Popen[bytes]
) -> None:
    path = str(fleet.directory / spawning.SOCKET_NAME)
    for junk in (b"", b"\xff\xff\xff\xffgarbage", b"\0\0\0\x05a\0x\0b"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(15)
            client.connect(path)
            client.sendall(junk)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(16) == b"", "a junk request must start nothing"
    # another user may not even connect (the socket is 0600 in a 0700 directory)
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    refused = subprocess.run(
        ["runuser", "-u", "postgres", "--", "/usr/bin/python3", "-c",
         f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"],
        capture_output=True, text=True, check=False, timeout=30)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr
    assert spawner.poll() is None
    once = fleet.once(1)
    assert once.returncode == 0, once.stderr
    assert "not served" in spawner_log(fleet)


def test_supervised_workers_are_forked_by_the_fleets_spawner(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    supervisord.wait_running("spawner", "worker_1", "worker_2", "worker_3")
    spawner = supervisord.pid("spawner")
    for srvid in (1, 2, 3):
        program = supervisord.pid(f"worker_{srvid}")
        wait_for(lambda s=srvid: forked_worker(spawner, s), 15,  # type: ignore[misc]
                 f"worker_{srvid} forked")
        # the status names the pid supervisord shows, so the control matches them
        wait_for(lambda s=srvid, p=program: (fleet.status(s) or {}).get("pid") == p,  # type: ignore[misc]
                 20, f"worker_{srvid} status")
    # supervisorctl stop/start act on the worker through its stand-in
    worker = forked_worker(spawner, 2)
    assert worker is not None
    # stand-ins and workers give way to supervisord, the spawner and the control
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, worker) == max(nice, spawning.NICE)
    assert os.getpriority(os.PRIO_PROCESS, supervisord.pid("worker_2")) == max(nice, spawning.NICE)
    assert os.getpriority(os.PRIO_PROCESS, spawner) == nice
    result = supervisord.ctl("stop", "worker_2")
    assert "stopped" in result.stdout, result.stdout + result.stderr
    assert not is_alive(worker)
    assert supervisord.ctl("start", "worker_2").returncode == 0
    wait_for(lambda: forked_worker(spawner, 2) not in (None, worker), 15, "worker_2 forked again")
