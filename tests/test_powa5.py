"""PoWA 5.0.2 (PostgreSQL 17): what our worker stores, beside upstream powa-collector 1.3.2."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import pytest
import simplejson as json
from psycopg import sql

from collector import repository
from collector.cli.client import Answer, Client
from collector.demo import sandbox
from collector.worker import streaming
from collector.worker.databases import CatalogRefresh, RefreshRequest, plan
from collector.worker.remote import RemoteSession
from collector.worker.sources import DbSource, render_cleanup
from collector.worker.streaming import Spool
from tests.conftest import POWA5_WORKLOAD, Supervisord
from tests.helpers import Fleet, Repo, permission_verdicts, wait_for
from tests.powa5 import (
    SHOP,
    filled_tables,
    remote_database_oids,
    tmp_rows,
    upstream_snapshot,
)


def once(fleet: Fleet, srvid: int) -> str:
    result = fleet.once(srvid, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def qualstats(remote: sandbox.Cluster) -> int:
    with remote.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_qualstats").fetchone()
    assert row is not None
    return int(row[0])


def catalog_refreshes(repo: Repo, srvid: int) -> dict[str, object]:
    return {str(name): ts for name, ts in repo.all(
        "SELECT datname, last_refresh FROM powa_catalog_databases WHERE srvid = %s", (srvid,)
    )}


def test_stores_every_table_upstream_fills(
    powa5_fleet: Fleet, powa5_repo: Repo, powa5_remotes: list[sandbox.Cluster]
) -> None:
    ours, theirs = powa5_repo.srvids
    for remote in powa5_remotes:
        with remote.connect() as conn:
            conn.execute("SELECT * FROM wide WHERE c1 = 3")
        assert qualstats(remote) > 0
    upstream_snapshot(powa5_repo, powa5_remotes[1], theirs)
    output = once(powa5_fleet, ours)
    assert "0 error(s)" in output, output
    assert powa5_repo.errors(ours) == []
    assert powa5_repo.snapshots(ours) == powa5_repo.snapshots(theirs) == 1
    filled = filled_tables(powa5_repo, ours)
    assert filled_tables(powa5_repo, theirs) <= filled
    # history of statements, per-database modules and catalogs, from both databases
    for table in ("powa_statements", "powa_statements_history_current",
                  "powa_all_tables_history_current", "powa_all_indexes_history_current",
                  "powa_user_functions_history_current", "powa_catalog_class",
                  "powa_catalog_attribute", "powa_qualstats_quals_history_current",
                  "powa_kcache_metrics_current", "powa_catalog_databases"):
        assert table in filled, table
    assert tmp_rows(powa5_repo, ours) == set()
    oids = remote_database_oids(powa5_remotes[0])
    tables = {str(r[0]) for r in powa5_repo.all(
        "SELECT relname FROM powa_catalog_class WHERE srvid = %s AND dbid = %s",
        (ours, oids[SHOP]))}
    assert {"orders", "customers"} <= tables
    stats = powa5_repo.one(
        "SELECT count(DISTINCT dbid) FROM powa_all_tables_history_current WHERE srvid = %s",
        (ours,))
    assert stats == len(oids)
    assert len(powa5_repo.all(
        "SELECT queryid FROM powa_statements WHERE srvid = %s", (ours,))) >= POWA5_WORKLOAD
    # query_cleanup ({pg_qualstats}.pg_qualstats_reset()) ran once the snapshot was stored
    assert qualstats(powa5_remotes[0]) == 0
    # the catalogs of every database one can connect to are marked refreshed
    refreshed = catalog_refreshes(powa5_repo, ours)
    assert {name for name, ts in refreshed.items() if ts} == set(oids)


def test_versions_go_to_powa_extension_config(
    powa5_fleet: Fleet, powa5_repo: Repo, powa5_remotes: list[sandbox.Cluster]
) -> None:
    ours = powa5_repo.srvids[0]
    once(powa5_fleet, ours)
    with powa5_remotes[0].connect() as conn:
        remote = {str(name): str(version) for name, version in conn.execute(
            "SELECT extname, extversion FROM pg_extension").fetchall()}
    stored = dict(powa5_repo.all(
        "SELECT extname, version FROM powa_extension_config WHERE srvid = %s", (ours,)))
    assert stored and all(stored[name] == remote[name] for name in stored), (stored, remote)
    assert stored["pg_qualstats"] == remote["pg_qualstats"]
    version = powa5_repo.one("SELECT version FROM powa_servers WHERE id = %s", (ours,))
    assert version.startswith("17.")


def test_a_second_snapshot_reads_catalogs_only_when_refreshed(
    powa5_fleet: Fleet, powa5_repo: Repo, powa5_remotes: list[sandbox.Cluster]
) -> None:
    ours = powa5_repo.srvids[0]
    once(powa5_fleet, ours)
    first = catalog_refreshes(powa5_repo, ours)
    assert first[SHOP] is not None
    once(powa5_fleet, ours)
    assert catalog_refreshes(powa5_repo, ours) == first
    assert powa5_repo.snapshots(ours) == 2
    assert powa5_repo.errors(ours) == []
    assert tmp_rows(powa5_repo, ours) == set()


def test_a_deactivated_db_module_is_not_copied(
    powa5_fleet: Fleet, powa5_repo: Repo
) -> None:
    ours = powa5_repo.srvids[0]
    powa5_repo.execute("SELECT powa_deactivate_db_module(%s, 'pg_stat_user_functions')", (ours,))
    once(powa5_fleet, ours)
    # upstream copies it anyway, and nothing takes the rows out of the _tmp table
    assert tmp_rows(powa5_repo, ours) == set()
    filled = filled_tables(powa5_repo, ours)
    assert "powa_user_functions_history_current" not in filled
    assert "powa_all_tables_history_current" in filled
    assert powa5_repo.errors(ours) == []


def test_version_mismatch_is_recorded_and_nothing_copied(
    powa5_fleet: Fleet, powa5_repo: Repo, remotes: list[sandbox.Cluster]
) -> None:
    # a PoWA 4.1 remote registered in the PoWA 5 repository
    srvid = powa5_repo.register(remotes[2], alias="powa4")
    result = powa5_fleet.once(srvid)
    assert result.returncode != 0
    errors = powa5_repo.errors(srvid)
    assert len(errors) == 1
    assert "Incompatible PoWA version" in errors[0]
    assert "(5.0.X)" in errors[0] and "(4.1.X)" in errors[0]
    assert powa5_repo.snapshots(srvid) == 0
    assert filled_tables(powa5_repo, srvid) <= {
        "powa_servers", "powa_snapshot_metas", "powa_extension_config", "powa_module_config",
        "powa_db_module_config"}


def test_a_failure_before_copying_is_recorded(
    powa5_fleet: Fleet, powa5_repo: Repo
) -> None:
    ours = powa5_repo.srvids[0]
    powa5_repo.execute("ALTER FUNCTION powa_db_functions(integer, integer)"
                       " RENAME TO gone_db_functions")
    result = powa5_fleet.once(ours)
    assert result.returncode != 0
    errors = powa5_repo.errors(ours)
    assert len(errors) == 1 and "powa_db_functions" in errors[0], errors
    assert powa5_repo.snapshots(ours) == 0
    assert tmp_rows(powa5_repo, ours) == set()


def test_a_database_that_cannot_be_reached_is_recorded_and_the_rest_stored(
    powa5_fleet: Fleet, powa5_repo: Repo,
    powa5_cluster_factory: Callable[[], sandbox.Cluster],
) -> None:
    remote = powa5_cluster_factory()
    with remote.connect("postgres") as conn:
        conn.execute("CREATE DATABASE locked")
        conn.execute("CREATE ROLE collector LOGIN SUPERUSER")
        conn.execute("REVOKE CONNECT ON DATABASE locked FROM PUBLIC")
        conn.execute("ALTER ROLE collector NOSUPERUSER")
        conn.execute("GRANT pg_read_all_stats, pg_signal_backend TO collector")
    with remote.connect() as conn:
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO collector")
        conn.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO collector")
    srvid = powa5_repo.register(remote, alias="locked", username="collector")
    output = once(powa5_fleet, srvid)
    errors = powa5_repo.errors(srvid)
    assert any("Could not connect to remote database locked" in e for e in errors), output
    assert powa5_repo.snapshots(srvid) == 1
    assert "powa_all_tables_history_current" in filled_tables(powa5_repo, srvid)
    assert tmp_rows(powa5_repo, srvid) == set()


def test_rows_the_repository_refuses_for_one_database_are_recorded_and_the_rest_stored(
    powa5_fleet: Fleet, powa5_repo: Repo, powa5_remotes: list[sandbox.Cluster]
) -> None:
    ours = powa5_repo.srvids[0]
    oids = remote_database_oids(powa5_remotes[0])
    # every database's pg_stat_all_tables rows go in one COPY: the repository refuses it
    refuse = sql.SQL("ALTER TABLE powa_all_tables_src_tmp ADD CONSTRAINT no_shop"
                     " CHECK (dbid <> {})").format(sql.Literal(oids[SHOP]))
    with powa5_repo.connect() as conn:
        conn.execute(refuse)
        conn.commit()
    try:
        once(powa5_fleet, ours)
    finally:
        powa5_repo.execute("ALTER TABLE powa_all_tables_src_tmp DROP CONSTRAINT no_shop")
    errors = powa5_repo.errors(ours)
    assert len(errors) == 1, errors
    assert "Error retrieving datasource data pg_stat_all_tables in database shop" in errors[0]
    assert powa5_repo.snapshots(ours) == 1
    tables = {int(r[0]) for r in powa5_repo.all(
        "SELECT DISTINCT dbid FROM powa_all_tables_history_current WHERE srvid = %s", (ours,))}
    assert tables == set(oids.values()) - {oids[SHOP]}
    indexes = {int(r[0]) for r in powa5_repo.all(
        "SELECT DISTINCT dbid FROM powa_all_indexes_history_current WHERE srvid = %s", (ours,))}
    assert oids[SHOP] in indexes
    assert tmp_rows(powa5_repo, ours) == set()


def test_cancel_reaches_the_worker_session_and_every_database_session(
    powa5_repo: Repo, powa5_remotes: list[sandbox.Cluster]
) -> None:
    # what the watchdog calls when a snapshot overruns or the worker stops
    with powa5_repo.connect() as conn:
        server = repository.read_server(conn, repository.require_powa(conn),
                                        powa5_repo.srvids[0])
    session = RemoteSession(server)
    session.connect()
    try:
        databases = [session.open_database(name, 60_000) for name in ("postgres", SHOP)]
        assert session.db_conns == tuple(databases)
        failures: list[BaseException] = []

        def sleep(conn: psycopg.Connection[tuple[object, ...]]) -> None:
            try:
                conn.execute("SELECT pg_sleep(60)")
            except psycopg.Error as exc:
                failures.append(exc)

        assert session.conn is not None
        sleepers = [threading.Thread(target=sleep, args=(conn,))
                    for conn in (session.conn, *databases)]
        for thread in sleepers:
            thread.start()
        with powa5_remotes[0].connect() as watcher:
            wait_for(lambda: watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
            ).fetchone() == (3,), 10, "three sleeping sessions")
        session.cancel()
        for thread in sleepers:
            thread.join(10)
        assert [type(f) for f in failures] == [psycopg.errors.QueryCanceled] * 3
        session.close_database(databases[0])
        assert session.db_conns == (databases[1],) and databases[0].closed
    finally:
        session.close()
    assert not session.db_conns


def test_a_spool_keeps_whole_sources_only_and_moves_to_a_file_when_big(
    powa5_remotes: list[sandbox.Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 kB of rows: past 4 kB the spool is a temporary file
    monkeypatch.setattr(streaming, "SPOOL_MEMORY", 4096)
    rows = "COPY (SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g) TO STDOUT"
    failing = "COPY (SELECT 1 / (500 - g) FROM generate_series(1, 1000) g) TO STDOUT"
    spool = Spool()
    with powa5_remotes[0].connect() as conn:
        assert spool.add("rows", "powa", conn, rows.encode()) == 1000
        with pytest.raises(psycopg.errors.DivisionByZero):
            spool.add("failing", "powa", conn, failing.encode())
        # the session is usable again, and nothing of the failed source is kept
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert [(p.source, p.rows) for p in spool.parts] == [("rows", 1000)]
        kept = b"".join(spool.parts[0].blocks())
        assert kept == b"".join(f"{g}\t{'x' * 100}\n".encode() for g in range(1, 1001))
    spool.close()


# ---------------------------------------------------------------- the control, on PoWA 5

def ask(dsn: str, command: str, *args: str, timeout: float = 3.0) -> Answer:
    with Client(dsn) as client:
        answers = client.ask(command, args, timeout=timeout)
    assert len(answers) == 1, f"no answer to {command} {args}"
    return answers[0]


def test_refresh_db_cat_is_answered_and_done_at_the_next_snapshot(
    powa5_fleet: Fleet, powa5_repo: Repo, running5: Supervisord
) -> None:
    ours = powa5_repo.srvids[0]
    assert powa5_fleet.once(ours).returncode == 0
    before = catalog_refreshes(powa5_repo, ours)
    assert before[SHOP] is not None
    refresh = ask(powa5_repo.dsn, "REFRESH_DB_CAT", str(ours), "1", SHOP)
    assert (refresh.status, refresh.data) == (
        "OK", "Catalogs will be refreshed during the next snapshot")
    # a second request adds up (upstream crashes on it)
    again = ask(powa5_repo.dsn, "REFRESH_DB_CAT", str(ours), "1", "postgres")
    assert again.status == "OK", again
    assert catalog_refreshes(powa5_repo, ours) == before
    time_before = powa5_repo.one("SELECT snapts FROM powa_snapshot_metas WHERE srvid = %s",
                                 (ours,))
    wait_for(lambda: ask(powa5_repo.dsn, "FORCE_SNAPSHOT", str(ours)).status == "OK", 15,
             "a forced snapshot accepted")
    wait_for(lambda: powa5_repo.one("SELECT snapts FROM powa_snapshot_metas WHERE srvid = %s",
                                    (ours,)) > time_before, 30, "the next snapshot")
    after = catalog_refreshes(powa5_repo, ours)
    assert after[SHOP] > before[SHOP]  # type: ignore[operator]
    assert after["postgres"] > before["postgres"]  # type: ignore[operator]
    assert after["powa"] == before["powa"]
    assert powa5_repo.errors(ours) == []
    unknown = ask(powa5_repo.dsn, "REFRESH_DB_CAT", "77", "0")
    assert (unknown.status, unknown.data) == ("ERROR", "Server id 77 not found")


def test_powa_signal_backend_members_get_answers_others_are_denied(
    powa5_repo: Repo, running5: Supervisord
) -> None:
    powa5_repo.execute("CREATE ROLE web LOGIN")
    # CREATE EXTENSION powa made the roles of powa_roles already
    powa5_repo.execute("GRANT powa_signal_backend TO web")
    powa5_repo.execute("CREATE ROLE nobody LOGIN")
    web = powa5_repo.cluster.dsn(user="web")
    nobody = powa5_repo.cluster.dsn(user="nobody")
    status = ask(web, "WORKERS_STATUS")
    assert status.status == "OK"
    assert json.loads(status.data) == {"1": "running", "2": "running"}
    assert ask(web, "REFRESH_DB_CAT", "1", "0").status == "OK"
    denied = ask(nobody, "WORKERS_STATUS")
    assert (denied.status, denied.data) == ("ERROR", "Permission denied")
    assert ask(nobody, "REFRESH_DB_CAT", "1", "0").data == "Permission denied"


def test_admission_on_powa5_tells_allowed_refused_and_gone_senders(powa5_repo: Repo) -> None:
    assert permission_verdicts(powa5_repo, "powa_signal_backend") == {
        "postgres": True, "viewer": False, "allowed": True, "gone": None}


# ---------------------------------------------------------------- pure logic
def test_cleanup_templates_get_quoted_schemas_only() -> None:
    rendered, problem = render_cleanup("SELECT {pg_qualstats}.pg_qualstats_reset()",
                                       {"pg_qualstats": 'odd "schema'})
    assert problem is None and rendered is not None
    assert rendered.as_string() == 'SELECT "odd ""schema".pg_qualstats_reset()'
    assert isinstance(rendered, sql.Composed)
    missing, why = render_cleanup("SELECT {nope}.f()", {"pg_qualstats": "public"})
    assert missing is None and why is not None and "'nope'" in why
    broken, why = render_cleanup("SELECT {pg_qualstats.f()", {"pg_qualstats": "public"})
    assert broken is None and why is not None and "malformed" in why
    assert render_cleanup(None, {}) == (None, None)


def test_databases_are_visited_only_for_something_to_collect() -> None:
    everywhere = DbSource("pg_stat_all_tables", "SELECT 1", ("public", "t"))
    only_shop = DbSource("pg_stat_user_functions", "SELECT 1", ("public", "f"),
                         dbnames=frozenset({"shop"}))
    catalog = DbSource("pg_class", "SELECT 1", ("public", "c"),
                       excluded=frozenset({"powa", "shop", "postgres"}), with_ts=False)
    names = ["postgres", "powa", "shop"]
    assert [(w.dbname, [s.name for s in w.sources]) for w in plan(names, [only_shop], [catalog],
                                                                  None)] == [
        ("shop", ["pg_stat_user_functions"])]
    assert plan(names, [], [catalog], None) == []
    forced = plan(names, [everywhere], [catalog], RefreshRequest(False, frozenset({"powa"})))
    assert [(w.dbname, len(w.sources)) for w in forced] == [
        ("postgres", 1), ("powa", 2), ("shop", 1)]


def test_refresh_requests_add_up_and_come_back_when_not_stored() -> None:
    queue = CatalogRefresh()
    queue.request(["a"])
    queue.request(["b"])
    taken = queue.take()
    assert taken == RefreshRequest(False, frozenset({"a", "b"}))
    assert queue.take() is None
    queue.request(["c"])
    queue.give_back(taken)
    assert queue.take() == RefreshRequest(False, frozenset({"a", "b", "c"}))
    queue.request(["a"])
    queue.request([])
    assert queue.take() == RefreshRequest(True)
