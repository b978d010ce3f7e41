"""Snapshots against real PoWA: what lands in the repository (worker --once)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from datetime import datetime

import pytest
from psycopg import sql

from collector import pg
from collector.demo import sandbox
from tests.conftest import BIG_WORKLOAD
from tests.helpers import PYTHON, ROOT, Fleet, Repo, stop_process, wait_for


def remote_statements(remote: sandbox.Cluster) -> set[tuple[int, int, int]]:
    with remote.connect() as conn:
        rows = conn.execute("SELECT queryid, dbid, userid FROM powa_statements_src(0)").fetchall()
    return {(int(q), int(d), int(u)) for q, d, u in rows}


def test_snapshots_store_history_of_every_statement(
    fleet: Fleet, repo: Repo, remotes: list[sandbox.Cluster]
) -> None:
    srvid = repo.srvids[0]
    before = remote_statements(remotes[0])
    assert len(before) >= BIG_WORKLOAD
    started = datetime.now().astimezone()
    k = 3
    for _ in range(k):
        result = fleet.once(srvid)
        assert result.returncode == 0, result.stderr
    assert repo.snapshots(srvid) == k
    stored = {
        (int(q), int(d), int(u))
        for q, d, u in repo.all(
            "SELECT queryid, dbid, userid FROM powa_statements WHERE srvid = %s", (srvid,)
        )
    }
    assert before <= stored
    # one history record per statement and snapshot, at the remote's own times
    rows = repo.all(
        "SELECT queryid, count(*), count(DISTINCT (record).ts), min((record).ts), max((record).ts)"
        " FROM powa_statements_history_current WHERE srvid = %s GROUP BY queryid",
        (srvid,),
    )
    by_query = {int(r[0]): r for r in rows}
    for queryid, _, _ in before:
        assert by_query[queryid][1] == k
        assert by_query[queryid][2] == k
    snapts = repo.one("SELECT snapts FROM powa_snapshot_metas WHERE srvid = %s", (srvid,))
    ts_values = {r[0] for r in repo.all(
        "SELECT DISTINCT (record).ts FROM powa_statements_history_current WHERE srvid = %s",
        (srvid,),
    )}
    assert len(ts_values) == k
    # the rows carry the remote's timestamps (its transaction time), one per snapshot
    finished = datetime.now().astimezone()
    assert all(started <= ts <= finished for ts in ts_values)
    # all sources of one snapshot share the remote's transaction time
    kcache_ts = {r[0] for r in repo.all(
        "SELECT DISTINCT (metrics).ts FROM powa_kcache_metrics_current WHERE srvid = %s",
        (srvid,),
    )}
    assert kcache_ts == ts_values
    assert started < snapts < finished
    assert repo.tmp_rows(srvid) == {}
    assert repo.errors(srvid) == []
    # versions of the remote are stored, as upstream does
    assert repo.one("SELECT version FROM powa_servers WHERE id = %s", (srvid,)).startswith("15.")
    versions = dict(repo.all(
        "SELECT extname, version FROM powa_extensions WHERE srvid = %s", (srvid,)
    ))
    assert versions["powa"] == "4.1.4"
    assert versions["pg_stat_kcache"] and versions["pg_qualstats"]


def test_broken_source_is_recorded_and_the_others_are_stored(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=100)
    srvid = repo.register(remote, alias="broken")
    assert fleet.once(srvid).returncode == 0
    with remote.connect() as conn:
        conn.execute("DROP EXTENSION pg_stat_kcache")
    statements_before = repo.one(
        "SELECT count(*) FROM powa_statements_history_current WHERE srvid = %s", (srvid,)
    )
    result = fleet.once(srvid)
    assert result.returncode == 0, result.stderr
    errors = repo.errors(srvid)
    assert len(errors) == 1
    assert "pg_stat_kcache" in errors[0]
    assert "Error retrieving datasource data" in errors[0]
    assert repo.snapshots(srvid) == 2
    assert repo.one(
        "SELECT count(*) FROM powa_statements_history_current WHERE srvid = %s", (srvid,)
    ) > statements_before
    assert repo.one(
        "SELECT count(*) FROM powa_stat_bgwriter_history_current WHERE srvid = %s", (srvid,)
    ) == 2
    assert repo.tmp_rows(srvid) == {}
    # the next good snapshot clears the stored errors (powa_take_snapshot resets them)
    with remote.connect() as conn:
        conn.execute("CREATE EXTENSION pg_stat_kcache")
    assert fleet.once(srvid).returncode == 0
    assert repo.errors(srvid) == []


def add_slow_source(
    repo: Repo, remote: sandbox.Cluster, srvid: int, seconds: float, priority: int = 100
) -> None:
    """A source that sleeps on the remote; by default the last, after the real ones."""
    with remote.connect() as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION slow_src(int) RETURNS TABLE(ts timestamptz, x int)"
            f" LANGUAGE sql AS $$ SELECT now(), 1 FROM pg_sleep({seconds}) $$"
        )
    repo.execute(
        "CREATE UNLOGGED TABLE IF NOT EXISTS slow_src_tmp (srvid int, ts timestamptz, x int)"
    )
    repo.execute(
        "CREATE OR REPLACE FUNCTION slow_snapshot(int) RETURNS void LANGUAGE sql"
        " AS $$ DELETE FROM slow_src_tmp WHERE srvid = $1 $$"
    )
    repo.execute(
        "INSERT INTO powa_functions (srvid, module, operation, function_name, query_source,"
        " priority) VALUES (%s, 'slow', 'snapshot', 'slow_snapshot', 'slow_src', %s)",
        (srvid, priority),
    )


def wait_for_slow_source(remote: sandbox.Cluster, srvid: int) -> None:
    """Until the worker's remote session runs the slow source (not this query, whose
    text matches the same pattern)."""
    with remote.connect() as conn:
        wait_for(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND pid <> pg_backend_pid() AND query LIKE '%%COPY (SELECT%%slow_src%%'",
            (f"powa-fleet worker {srvid}",),
        ).fetchone()[0], 20, "the slow source to run")  # type: ignore[index]


def test_kill_9_mid_snapshot_leaves_nothing_behind(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=200)
    srvid = repo.register(remote, alias="killed")
    assert fleet.once(srvid).returncode == 0
    history = repo.one(
        "SELECT count(*) FROM powa_statements_history_current WHERE srvid = %s", (srvid,)
    )
    add_slow_source(repo, remote, srvid, 30)
    process = subprocess.Popen(
        [PYTHON, "-m", "collector.worker", "-c", str(fleet.cfg_path), "--srvid", str(srvid),
         "--once"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # the statements are copied, the slow source runs: kill the worker now
    wait_for_slow_source(remote, srvid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    wait_for(lambda: not repo.worker_sessions(srvid), 10, "the worker's sessions to end")
    assert repo.tmp_rows(srvid) == {}
    assert repo.snapshots(srvid) == 1
    assert repo.one(
        "SELECT count(*) FROM powa_statements_history_current WHERE srvid = %s", (srvid,)
    ) == history
    repo.execute("DELETE FROM powa_functions WHERE module = 'slow'")
    result = fleet.once(srvid)
    assert result.returncode == 0, result.stderr
    assert repo.snapshots(srvid) == 2
    assert repo.errors(srvid) == []
    assert repo.one(
        "SELECT count(*) FROM powa_statements_history_current WHERE srvid = %s", (srvid,)
    ) > history


def test_concurrent_snapshots_of_one_server_never_overlap(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=50)
    srvid = repo.register(remote, alias="overlap")
    add_slow_source(repo, remote, srvid, 3)
    first = subprocess.Popen(
        [PYTHON, "-m", "collector.worker", "-c", str(fleet.cfg_path), "--srvid", str(srvid),
         "--once"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(lambda: repo.worker_sessions(srvid), 10, "the first snapshot to start")
    second = fleet.once(srvid)
    assert second.returncode == 1
    assert "another snapshot of server" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert repo.snapshots(srvid) == 1
    assert repo.tmp_rows(srvid) == {}


def qualstats(remote: sandbox.Cluster) -> int:
    with remote.connect() as conn:
        return int(conn.execute("SELECT count(*) FROM pg_qualstats()").fetchone()[0])  # type: ignore[index]


def test_take_snapshot_failure_rolls_back_every_copied_row(
    fleet: Fleet, repo: Repo, remotes: list[sandbox.Cluster]
) -> None:
    srvid = repo.srvids[1]
    sandbox.create_workload(remotes[1], 50)
    quals = qualstats(remotes[1])
    assert quals > 0
    # powa_take_snapshot cannot lock the metas row: upstream would commit the _tmp rows
    repo.execute(
        "CREATE FUNCTION fail_take(int) RETURNS void LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'broken repository function'; END $$"
    )
    repo.execute("ALTER FUNCTION powa_take_snapshot(integer) RENAME TO real_take_snapshot")
    repo.execute(
        "CREATE FUNCTION powa_take_snapshot(_srvid integer) RETURNS integer LANGUAGE plpgsql"
        " AS $$ BEGIN PERFORM fail_take(_srvid); RETURN 0; END $$"
    )
    result = fleet.once(srvid)
    assert result.returncode == 1
    assert "broken repository function" in result.stderr
    assert repo.tmp_rows(srvid) == {}
    assert any("broken repository function" in e for e in repo.errors(srvid))
    assert repo.snapshots(srvid) == 0
    # nothing was stored, so pg_qualstats was not reset (upstream resets it anyway)
    assert qualstats(remotes[1]) >= quals
    repo.execute("DROP FUNCTION powa_take_snapshot(integer)")
    repo.execute("ALTER FUNCTION real_take_snapshot(integer) RENAME TO powa_take_snapshot")
    assert fleet.once(srvid).returncode == 0
    assert qualstats(remotes[1]) == 0


def test_a_snapshot_past_its_period_skips_the_remaining_sources(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="late", frequency=5)
    # the first source sleeps past the 5 s budget of the remote part
    add_slow_source(repo, remote, srvid, 8, priority=-10)
    started = time.monotonic()
    result = fleet.once(srvid)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 12
    assert "exceeded its 5s on the remote server: skipped" in result.stdout
    errors = repo.errors(srvid)
    assert any("Error retrieving datasource data slow" in e for e in errors)
    late = [e for e in errors if "exceeded its 5s on the remote server" in e]
    assert len(late) == 1
    assert "powa_statements_src" in late[0] and "powa_kcache_src" in late[0]
    assert repo.snapshots(srvid) == 1
    assert repo.tmp_rows(srvid) == {}


@pytest.mark.parametrize("case, expected", [("unknown", 3), ("disabled", 4), ("repository", 3)])
def test_unknown_or_disabled_server_exits_with_its_code(
    fleet: Fleet, repo: Repo, case: str, expected: int
) -> None:
    srvid = {"unknown": 9999, "disabled": repo.srvids[2], "repository": 0}[case]
    if case == "disabled":
        repo.set_frequency(-1, srvid)
    result = fleet.once(srvid)
    assert result.returncode == expected
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"server {srvid}" in result.stderr


def test_remote_unreachable_once_fails_with_one_line(fleet: Fleet, repo: Repo) -> None:
    repo.execute(
        "SELECT powa_register_server(hostname => '127.0.0.1', port => %s, alias => 'gone',"
        " frequency => 300)", (sandbox.free_port(),)
    )
    srvid = int(repo.one("SELECT max(id) FROM powa_servers"))
    started = time.monotonic()
    result = fleet.once(srvid)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "cannot connect to the remote server" in result.stderr
    assert time.monotonic() - started < 30
    # powa-web shows the reason
    assert any("Error connecting to remote server" in e for e in repo.errors(srvid))


def test_sigterm_during_snapshot_rolls_back_and_exits_in_time(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=50)
    srvid = repo.register(remote, alias="stopped")
    add_slow_source(repo, remote, srvid, 60)
    repo.due_in(srvid, 4, frequency=120)
    process = fleet.start_worker(srvid)
    wait_for(lambda: repo.worker_sessions(srvid), 20, "the snapshot to start")
    wait_for_slow_source(remote, srvid)
    started = time.monotonic()
    assert stop_process(process, timeout=30) == 0
    # stop_grace is 5s in the test configuration
    assert time.monotonic() - started < 15
    assert "cancelled and rolled back on stop" in fleet.log(srvid)
    wait_for(lambda: not repo.worker_sessions(srvid), 10, "sessions to end")
    assert repo.tmp_rows(srvid) == {}
    assert repo.snapshots(srvid) == 0
    assert fleet.status(srvid)["status"] == "stopped"  # type: ignore[index]


def test_a_locked_server_row_postpones_the_versions_not_the_snapshot(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="versions")
    repo.execute("UPDATE powa_servers SET version = 'old' WHERE id = %s", (srvid,))
    # an open transaction holds the row the versions go to, as an UPDATE of it would
    with repo.connect() as holder, holder.transaction():
        holder.execute("SELECT 1 FROM powa_servers WHERE id = %s FOR NO KEY UPDATE", (srvid,))
        result = fleet.run("-m", "collector.worker", "-c", str(fleet.cfg_path), "--srvid",
                           str(srvid), "--once", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "versions not saved, next snapshot tries again" in result.stdout + result.stderr
    assert repo.snapshots(srvid) == 1
    assert repo.tmp_rows(srvid) == {}
    assert repo.one("SELECT version FROM powa_servers WHERE id = %s", (srvid,)) == "old"
    assert fleet.once(srvid).returncode == 0
    assert repo.snapshots(srvid) == 2
    assert repo.one("SELECT version FROM powa_servers WHERE id = %s", (srvid,)).startswith("15.")


def test_composed_statements_are_kept_per_key_and_client_encoding(repo: Repo) -> None:
    composing: list[str] = []

    def compose() -> sql.Composable:
        composing.append("once")
        return sql.SQL("SELECT 1 AS {}").format(sql.Identifier("été"))

    with repo.cluster.connect() as conn:
        first = pg.composed(conn, ("test statement", 1), compose)
        assert first == 'SELECT 1 AS "été"'.encode()
        assert pg.composed(conn, ("test statement", 1), compose) is first
        assert len(composing) == 1
        assert pg.composed(conn, ("test statement", 2), compose) == first
        assert len(composing) == 2
        # the same statement, sent in another encoding, is composed again for it
        conn.execute("SET client_encoding TO 'LATIN1'")
        assert pg.composed(conn, ("test statement", 1), compose) == 'SELECT 1 AS "été"'.encode(
            "latin-1")
        assert len(composing) == 3
        assert conn.execute(pg.composed(conn, ("test statement", 1), compose)).fetchone() == (1,)
