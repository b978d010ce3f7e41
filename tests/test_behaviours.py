"""What the README promises and no other test shows, each checked the way a user sees it."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable

import pytest
import redis

from collector import config
from collector.demo import sandbox
from collector.fleet import programs
from collector.worker import loop, taker
from tests.conftest import Supervisord
from tests.helpers import ROOT, Fleet, Repo, wait_for
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
        table = programs.Table(config.load(fleet.cfg_path))
        table.update("worker_1", {"state": "RUNNING", "pid": 11, "since": 1.0})
        client = redis.Redis.from_url(server.url)
        assert client.hget(f"{fleet.prefix}:programs", "worker_1") is not None
        server.stop()
        table.update("worker_1", {"state": "EXITED", "pid": 0, "since": 2.0})
        table.update("worker_2", {"state": "RUNNING", "pid": 12, "since": 3.0})
        table.remove("worker_1")
        assert table.failing
        # Redis back, empty (it lost its data): the next tick writes the whole table
        server.start()
        table.tick()
        stored = client.hgetall(f"{fleet.prefix}:programs")
        assert set(stored) == {b"worker_2"}
        assert b'"pid": 12' in stored[b"worker_2"] or b'"pid":12' in stored[b"worker_2"]
        assert client.exists(f"{fleet.prefix}:programs:alive")
        assert not table.failing
        client.close()
    finally:
        server.stop()
