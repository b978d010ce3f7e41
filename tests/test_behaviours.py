"""What the README promises and no other test shows, each checked the way a user sees it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from collector import config, keys, repository
from collector.demo import sandbox
from collector.fleet import programs
from collector.fleet.supervisord import Supervisor
from collector.worker import loop, taker
from tests.conftest import Supervisord
from tests.helpers import PYTHON, ROOT, Fleet, Repo, wait_for
from tests.test_snapshot import add_slow_source
from tests.test_worker import slow_take_snapshot


def test_fleet_found_through_the_environment_is_private(fleet: Fleet, repo: Repo) -> None:
    env = {**os.environ, "POWA_FLEET_CONFIG": str(fleet.cfg_path)}
    result = fleet.run(str(ROOT / "create_supervisord_config.py"), env=env)
    assert result.returncode == 0, result.stderr
    for name in ("workers_available", "workers_enabled", "logs"):
        assert stat.S_IMODE((fleet.directory / name).stat().st_mode) == 0o700, name
    assert stat.S_IMODE((fleet.directory / "supervisord.conf").stat().st_mode) == 0o600
    assert sorted(p.name for p in (fleet.directory / "workers_enabled").iterdir()) == [
        f"worker_{srvid}.conf" for srvid in repo.srvids
    ]


def test_status_exits_5_when_redis_cannot_be_asked(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    supervisord.wait_running("control", "worker_1")
    logs = sorted((fleet.directory / "logs").iterdir())
    assert {stat.S_IMODE(p.stat().st_mode) for p in logs} == {0o600}, logs
    dead = fleet.directory / "dead-redis.cfg"
    text = fleet.cfg_path.read_text().replace(
        fleet.redis_url, f"redis://127.0.0.1:{sandbox.free_port()}/0")
    dead.write_text(text)
    result = fleet.run("-m", "collector", "-c", str(dead), "status")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "unknown: Redis unavailable" in result.stdout


def test_a_version_mismatch_is_recorded_and_nothing_copied(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="mismatch", frequency=300)
    with remote.connect() as conn:
        conn.execute("UPDATE pg_extension SET extversion = '3.2.0' WHERE extname = 'powa'")
    result = fleet.once(srvid)
    assert result.returncode == 1
    errors = repo.errors(srvid)
    assert errors and "3.2" in " ".join(errors), errors
    assert repo.one("SELECT count(*) FROM powa_statements WHERE srvid = %s", (srvid,)) == 0
    assert repo.tmp_rows(srvid) == {}


def test_a_second_sigterm_cancels_a_snapshot_at_once(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="slow", frequency=300)
    add_slow_source(repo, remote, srvid, 120)
    fleet.write_config(collector={"stop_grace": "60", "connect_timeout": "2"})
    repo.due_in(srvid, 2, frequency=300)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: (fleet.status(srvid) or {}).get("snapshot_in_progress"), 20,
             "a snapshot under way")
    worker.send_signal(signal.SIGTERM)
    wait_for(lambda: (fleet.status(srvid) or {}).get("status") == "stopping", 5, "stopping")
    time.sleep(1)
    # within its 60 s grace, the snapshot goes on
    assert worker.poll() is None
    worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    worker.wait(timeout=15)
    assert time.monotonic() - started < 15
    assert worker.returncode == 0
    assert repo.snapshots(srvid) == 0
    assert repo.tmp_rows(srvid) == {}
    assert (fleet.status(srvid) or {}).get("status") == "stopped"


def test_the_repository_part_of_a_snapshot_has_a_deadline(
    fleet: Fleet, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    srvid = repo.srvids[0]
    slow_take_snapshot(repo, 120)
    monkeypatch.setattr(taker, "repository_budget", lambda frequency: 2.0)
    worker = loop.Worker(config.load(fleet.cfg_path), srvid, once=True)
    started = time.monotonic()
    assert worker.run() == 1
    # the deadline, plus the watchdog's wait before it drops an ignored cancel
    assert time.monotonic() - started < 30
    assert "canceling statement" in (worker.state.last_error or "")
    assert repo.snapshots(srvid) == 0
    assert repo.tmp_rows(srvid) == {}
    assert not [s for s in repo.worker_sessions(srvid) if s[0] != "idle"]


def test_the_event_listener_writes_what_happened_while_redis_was_away(fleet: Fleet) -> None:
    server = sandbox.RedisServer()
    server.start()
    try:
        fleet.write_config(redis={"url": server.url, "prefix": fleet.prefix})
        cfg = config.load(fleet.cfg_path)
        key = keys.programs_key(fleet.prefix, cfg.fleet.host)
        table = programs.Table(cfg)
        table.update("worker_1", {"state": "RUNNING", "pid": 11, "since": 1.0})
        client = redis.Redis.from_url(server.url)
        assert client.hget(key, "worker_1") is not None
        server.stop()
        table.update("worker_1", {"state": "EXITED", "pid": 0, "since": 2.0})
        table.update("worker_2", {"state": "RUNNING", "pid": 12, "since": 3.0})
        table.remove("worker_1")
        assert table.failing
        # Redis back, empty (it lost its data): the next tick writes the whole table
        server.start()
        table.tick()
        stored = client.hgetall(key)
        assert set(stored) == {b"worker_2"}
        assert b'"pid": 12' in stored[b"worker_2"] or b'"pid":12' in stored[b"worker_2"]
        assert client.exists(keys.alive_key(fleet.prefix, cfg.fleet.host))
        # the table goes by itself once its listener is gone
        assert 0 < client.ttl(key) <= programs.TABLE_TTL
        assert not table.failing
        client.close()
    finally:
        server.stop()


def test_the_event_listener_writes_events_before_supervisord_answers(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet starting: the table comes from events first, supervisord's read replaces it later.

    supervisord busy starting hundreds of programs answers its XML-RPC late:
    the read runs beside the events, which are written meanwhile.
    """
    cfg = config.load(fleet.cfg_path)
    key = keys.programs_key(fleet.prefix, cfg.fleet.host)
    answer = {
        "worker_1": {"statename": "RUNNING", "pid": 11, "start": 1.0},
        "worker_2": {"statename": "RUNNING", "pid": 12, "start": 2.0},
        "worker_3": {"statename": "STARTING", "pid": 0, "start": 3.0},
    }
    asked, release = threading.Event(), threading.Event()

    def slow_supervisord(self: Supervisor) -> dict[str, dict[str, object]]:
        asked.set()
        release.wait(30)
        return answer

    monkeypatch.setattr(Supervisor, "all_processes", slow_supervisord)
    with fleet.redis() as client:
        client.hset(key, "worker_99", '{"state": "RUNNING", "pid": 99, "since": 0}')
        table = programs.Table(cfg)
        table.update("worker_1", {"state": "STARTING", "pid": 0, "since": 1.0})
        # readers trust it at once, and what an earlier listener left stays until the read
        assert set(client.hkeys(key)) == {b"worker_1", b"worker_99"}
        assert client.exists(keys.alive_key(fleet.prefix, cfg.fleet.host))
        started = time.monotonic()
        table.tick()
        assert asked.wait(5)
        # supervisord has not answered: events go on, and nothing waited for it
        table.update("worker_3", {"state": "RUNNING", "pid": 13, "since": 4.0})
        assert time.monotonic() - started < 1
        assert b'"RUNNING"' in (client.hget(key, "worker_3") or b"")
        release.set()
        wait_for(lambda: table.answers.qsize() > 0, 5, "supervisord's answer")
        table.tick()
        assert set(client.hkeys(key)) == {b"worker_1", b"worker_2", b"worker_3"}
        assert b'"RUNNING"' in (client.hget(key, "worker_1") or b"")
        # worker_3's event came while the read was under way: the event's state stays
        assert b'"pid": 13' in (client.hget(key, "worker_3") or b"")
        client.delete(key)


def test_a_frozen_session_inside_a_snapshot_transaction_loses_its_locks(
    fleet: Fleet, repo: Repo
) -> None:
    """What a worker frozen (SIGSTOP, swapped out) between two statements leaves behind."""
    srvid = repo.srvids[0]
    frozen = repository.connect(repo.dsn, f"worker {srvid}", 5)
    frozen.execute("SELECT 1 FROM powa_snapshot_metas WHERE srvid = %s FOR UPDATE NOWAIT",
                   (srvid,))
    pid = frozen.info.backend_pid
    # another collector of this server is refused while the row is held
    assert fleet.once(srvid).returncode == 1
    started = time.monotonic()
    wait_for(lambda: not repo.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                  (pid,)), 90, "the server to end the idle transaction")
    assert time.monotonic() - started < 75
    assert fleet.once(srvid).returncode == 0
    frozen.close()


@contextlib.contextmanager
def silent_dns() -> Iterator[Path]:
    """A DNS server on 127.0.0.77 that reads every query and never answers; its resolv.conf."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.77", 53))
    sock.settimeout(0.2)
    stop = threading.Event()

    def swallow() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                sock.recv(4096)

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as directory:
        resolv = Path(directory) / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.77\noptions timeout:30 attempts:3\n")
        try:
            yield resolv
        finally:
            stop.set()
            thread.join()
            sock.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a mount namespace")
def test_a_dns_that_never_answers_costs_the_connect_timeout_only(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=5)
    srvid = repo.register(remote, alias="unresolvable", frequency=300)
    repo.execute("UPDATE powa_servers SET hostname = 'db.blackhole.test' WHERE id = %s",
                 (srvid,))
    with silent_dns() as resolv:
        started = time.monotonic()
        # a mount namespace of its own, where /etc/resolv.conf names the silent server
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
             str(resolv), PYTHON, "-m", "collector.worker", "-c", str(fleet.cfg_path),
             "--srvid", str(srvid), "--once"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "could not resolve host name 'db.blackhole.test' within 2s" in result.stderr
    # connect_timeout is 2 s in the tests' configuration; libpq alone took 90 s
    assert elapsed < 15, elapsed
