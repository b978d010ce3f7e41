"""The fleet: generated files, a real supervisord and its web UI, enable/disable, apply."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from collector.demo import sandbox
from tests.conftest import Supervisord, start_supervisord
from tests.helpers import Fleet, Repo, wait_for, web_states, web_ui

WORKERS = ("worker_1", "worker_2", "worker_3")

HOSTILE = [
    "evil\n[program:x]\ncommand=/bin/sh -c 'touch /tmp/pwned'",
    "%(ENV_HOME)s",
    "%s %d 100%",
    "a ; inline comment",
    "# not a comment",
    "quote's \"double\" `back`",
    "ünïcødé ☃ 漢字",
    "command=rm -rf /",
    "\\ backslash \\n",
]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_generated_files(fleet: Fleet, repo: Repo) -> None:
    result = fleet.generate()
    assert result.returncode == 0, result.stderr
    available = fleet.directory / "workers_available"
    enabled = fleet.directory / "workers_enabled"
    assert sorted(files(available)) == [f"{w}.conf" for w in WORKERS]
    for name in WORKERS:
        link = enabled / f"{name}.conf"
        assert link.is_symlink()
        assert link.resolve() == (available / f"{name}.conf").resolve()
        assert not os.readlink(link).startswith("/")
    for path in [*available.iterdir(), fleet.directory / "supervisord.conf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conf = (fleet.directory / "supervisord.conf").read_text()
    # supervisord gets a hash of the web UI password, never the password itself
    assert "web-secret" not in conf
    assert "password = {SHA}" in conf
    assert "files = workers_enabled/*.conf" in conf
    worker = (available / "worker_2.conf").read_text()
    assert "[program:worker_2]" in worker
    assert "--srvid 2" in worker
    assert "exitcodes = 0,2,3,4" in worker
    assert "stopwaitsecs = 20" in worker  # above the worker's stop_grace (5 s in tests)
    # a second run with no change rewrites nothing
    mtimes = {p: p.stat().st_mtime_ns for p in available.iterdir()}
    again = fleet.generate()
    assert again.returncode == 0
    assert again.stdout.strip() == "nothing changed"
    assert {p: p.stat().st_mtime_ns for p in available.iterdir()} == mtimes


def test_auto_enable_off_generates_disabled_programs(fleet: Fleet, repo: Repo) -> None:
    fleet.write_config(collector={"auto_enable": "false"})
    assert fleet.generate().returncode == 0
    assert list((fleet.directory / "workers_enabled").iterdir()) == []
    assert len(list((fleet.directory / "workers_available").iterdir())) == 3


def test_three_servers_run_and_snapshot_under_supervisord(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    for srvid in repo.srvids:
        repo.due_in(srvid, 4, frequency=5)
    supervisord.ctl("restart", "all")
    supervisord.wait_running("control", *WORKERS)
    wait_for(lambda: all(repo.snapshots(s) >= 1 for s in repo.srvids), 20,
             "snapshots of every server")
    # the web UI: basic auth, and every program listed
    assert web_ui(fleet.http_port, None)[0] == 401
    assert web_ui(fleet.http_port, ("admin", "wrong"))[0] == 401
    code, page = web_ui(fleet.http_port, ("admin", "web-secret"))
    assert code == 200
    assert web_states(page) == dict.fromkeys(("control", "programs", "spawner", *WORKERS),
                                             "running")


def test_stop_and_start_one_worker(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    for srvid in repo.srvids:
        repo.due_in(srvid, 4, frequency=5)
    supervisord.ctl("restart", "all")
    supervisord.wait_running(*WORKERS)
    wait_for(lambda: all(repo.snapshots(s) >= 1 for s in repo.srvids), 20, "snapshots")
    result = supervisord.ctl("stop", "worker_2")
    assert "worker_2: stopped" in result.stdout
    assert supervisord.state("worker_2") == "STOPPED"
    document = fleet.status(2)
    assert document is None or document["status"] == "stopped"
    assert repo.worker_sessions(2) == []
    assert repo.tmp_rows(2) == {}
    stopped_count = repo.snapshots(2)
    others = {s: repo.snapshots(s) for s in (1, 3)}
    wait_for(lambda: all(repo.snapshots(s) > n for s, n in others.items()), 15,
             "the other workers to keep snapshotting")
    assert repo.snapshots(2) == stopped_count
    assert "worker_2: started" in supervisord.ctl("start", "worker_2").stdout
    wait_for(lambda: repo.snapshots(2) > stopped_count, 15, "worker_2 to snapshot again")


def test_the_event_listener_starts_the_workers_at_a_pace(fleet: Fleet, repo: Repo) -> None:
    """Workers have autostart = false: the listener starts them, start_rate a second.

    A worker an operator stopped stays stopped; one supervisord has never
    started (a group added by ``supervisorctl add``/``update``) is started.
    """
    fleet.write_config(fleet={"start_rate": "1"})
    assert fleet.generate().returncode == 0
    assert "autostart = false" in (fleet.directory / "workers_available/worker_1.conf").read_text()
    running = start_supervisord(fleet)
    try:
        running.wait_running(*WORKERS)
        starts = {name: int((running.rpc.process(name) or {})["start"]) for name in WORKERS}
        # one a second, lowest ids first
        assert starts["worker_1"] <= starts["worker_2"] <= starts["worker_3"], starts
        assert starts["worker_3"] - starts["worker_1"] >= 1, starts
        log_path = fleet.directory / "logs/programs.log"
        log = log_path.read_text()
        assert "starting 3 worker programs, 1 a second" in log
        assert "3 worker programs started in" in log
        assert "worker_2: stopped" in running.ctl("stop", "worker_2").stdout
        # worker_3 removed and added again: supervisord has never started this one
        assert "worker_3: stopped" in running.ctl("stop", "worker_3").stdout
        assert "removed process group" in running.ctl("remove", "worker_3").stdout
        assert "added process group" in running.ctl("add", "worker_3").stdout
        running.wait_running("worker_3")
        # a new listener looks at the whole table, and leaves worker_2 alone
        looked = log_path.read_text().count("no worker program waiting to be started")
        running.ctl("restart", "programs")
        wait_for(lambda: log_path.read_text().count("no worker program waiting to be started")
                 > looked, 15, "the new listener's look at supervisord's table")
        assert running.state("worker_2") == "STOPPED"
    finally:
        running.stop()


def test_disable_by_symlink_stays_disabled_until_enabled(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    supervisord.wait_running(*WORKERS)
    (fleet.directory / "workers_enabled" / "worker_2.conf").unlink()
    result = fleet.generate("--apply")
    assert result.returncode == 0, result.stderr
    assert "worker_2: stopped and removed" in result.stdout
    assert supervisord.state("worker_2") is None
    assert supervisord.state("worker_1") == "RUNNING"
    for _ in range(2):
        again = fleet.generate("--apply")
        assert again.returncode == 0
        assert "worker_2: disabled" in again.stdout
        assert not (fleet.directory / "workers_enabled" / "worker_2.conf").exists()
        assert supervisord.state("worker_2") is None
    enabled = fleet.generate("--enable", "2")
    assert enabled.returncode == 0, enabled.stderr
    assert "worker_2: started" in enabled.stdout
    supervisord.wait_running("worker_2")
    disabled = fleet.generate("--disable", "2")
    assert "worker_2: stopped and removed" in disabled.stdout
    missing = fleet.generate("--enable", "42")
    assert missing.returncode == 2
    assert "worker_42 is not in" in missing.stderr


def test_add_and_delete_servers_touch_no_other_worker(
    fleet: Fleet, repo: Repo, supervisord: Supervisord,
    cluster_factory: Callable[..., sandbox.Cluster],
) -> None:
    supervisord.wait_running(*WORKERS)
    pids = {name: supervisord.pid(name) for name in WORKERS}
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="fourth")
    repo.due_in(srvid, 3, frequency=5)
    result = fleet.generate("--apply")
    assert result.returncode == 0, result.stderr
    assert f"worker_{srvid}: started" in result.stdout
    supervisord.wait_running(f"worker_{srvid}")
    wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "the new server's first snapshot")
    assert {name: supervisord.pid(name) for name in WORKERS} == pids
    repo.execute("SELECT powa_delete_and_purge_server(%s)", (srvid,))
    removed = fleet.generate("--apply")
    assert f"worker_{srvid}: stopped and removed" in removed.stdout
    assert supervisord.state(f"worker_{srvid}") is None
    assert not (fleet.directory / "workers_available" / f"worker_{srvid}.conf").exists()
    assert not (fleet.directory / "workers_enabled" / f"worker_{srvid}.conf").is_symlink()
    assert {name: supervisord.pid(name) for name in WORKERS} == pids


def test_hostile_rows_generate_the_same_files_as_plain_ones(fleet: Fleet, repo: Repo) -> None:
    repo.execute("DELETE FROM powa_servers WHERE id > 0")
    for i, text in enumerate(HOSTILE, 1):
        repo.execute(
            "INSERT INTO powa_servers (id, hostname, port, alias, username, password, dbname,"
            " frequency) VALUES (%s, %s, %s, %s, %s, %s, %s, 60)",
            (100 + i, "127.0.0.1\n" + text, 1 + i, text, text, "pw-" + text, text),
        )
        repo.execute("INSERT INTO powa_snapshot_metas (srvid) VALUES (%s)", (100 + i,))
    assert fleet.generate().returncode == 0
    hostile = files(fleet.directory / "workers_available")
    hostile_conf = (fleet.directory / "supervisord.conf").read_bytes()
    for i in range(1, len(HOSTILE) + 1):
        repo.execute(
            "UPDATE powa_servers SET hostname = 'h', alias = %s, username = 'u', password = NULL,"
            " dbname = 'd' WHERE id = %s", (f"plain{i}", 100 + i),
        )
    plain = fleet.generate()
    assert plain.stdout.strip() == "nothing changed"
    assert files(fleet.directory / "workers_available") == hostile
    assert (fleet.directory / "supervisord.conf").read_bytes() == hostile_conf
    everything = b"".join(hostile.values()) + hostile_conf
    for text in HOSTILE:
        assert ("pw-" + text).encode() not in everything
    assert b"pwned" not in everything
    # and supervisord reads them: every program loaded, none parsed out of a row
    repo.execute(
        "UPDATE powa_servers SET hostname = 'bad\n[program:x]', alias = NULL WHERE id > 100"
    )
    running = start_supervisord(fleet)
    try:
        names = set(running.rpc.all_processes())
        expected = {f"worker_{100 + i}" for i in range(1, len(HOSTILE) + 1)}
        assert names == {"control", "programs", "spawner"} | expected
    finally:
        running.stop()


def test_a_worker_that_cannot_work_is_not_restarted(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    supervisord.wait_running(*WORKERS)
    supervisord.ctl("stop", "worker_2")
    # the server leaves powa_servers, but nobody reloaded the fleet
    repo.execute("SELECT powa_delete_and_purge_server(2)")
    supervisord.ctl("start", "worker_2")
    wait_for(lambda: supervisord.state("worker_2") == "EXITED", 15, "worker_2 to exit")
    info = supervisord.rpc.process("worker_2")
    assert info is not None and info["exitstatus"] == 3
    time.sleep(4)
    # exit status 3 is expected: no restart, no crash loop
    assert supervisord.state("worker_2") == "EXITED"
    assert "not in powa_servers" in (fleet.directory / "logs" / "worker_2.log").read_text()


def test_generator_errors_are_one_line_and_write_nothing(
    fleet: Fleet, repo: Repo, tmp_path: Path
) -> None:
    fleet.write_config(supervisor={"http": "0.0.0.0:9001", "password": ""})
    result = fleet.generate()
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not a loopback address" in result.stderr
    fleet.write_config(repository={"dsn": f"postgresql://postgres@127.0.0.1:{sandbox.free_port()}"
                                          "/powa?connect_timeout=2"})
    result = fleet.generate()
    assert result.returncode == 5
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot connect to the repository" in result.stderr
    assert sorted(p.name for p in fleet.directory.iterdir()) == ["collector.cfg"]
    # a directory that cannot be written: a file stands where workers_available/ goes
    fleet.write_config()
    (fleet.directory / "workers_available").write_text("in the way")
    result = fleet.generate()
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot write the fleet" in result.stderr
    assert not (fleet.directory / "supervisord.conf").exists()
    assert not [p for p in fleet.directory.rglob(".*") if p.name != ".fleet.lock"]


def test_apply_without_supervisord_is_a_clear_error(fleet: Fleet, repo: Repo) -> None:
    result = fleet.generate("--apply")
    assert result.returncode == 5
    assert "applying them failed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # --enable without a running supervisord only changes the symlink
    assert fleet.generate("--disable", "1").returncode == 0
    enable = fleet.generate("--enable", "1")
    assert enable.returncode == 0
    assert "takes effect when it starts" in enable.stdout


def test_a_foreign_file_in_workers_enabled_is_refused(fleet: Fleet, repo: Repo) -> None:
    assert fleet.generate().returncode == 0
    enabled = fleet.directory / "workers_enabled"
    rogue = fleet.directory / "rogue.conf"
    rogue.write_text("[program:worker_1]\ncommand = /bin/sh -c 'echo owned'\n")
    (enabled / "worker_1.conf").unlink()
    (enabled / "worker_1.conf").symlink_to(rogue)
    (enabled / "extra.conf").write_text("[program:extra]\ncommand = /bin/true\n")
    for result in (fleet.generate(), fleet.generate("--enable", "2")):
        assert result.returncode == 2
        assert f"{enabled / 'worker_1.conf'} is not a symlink to" in result.stderr
        assert f"{enabled / 'extra.conf'} is not a symlink to" in result.stderr
    assert (enabled / "worker_1.conf").resolve() == rogue


def test_settings_supervisord_holds_itself_are_reported_as_needing_a_restart(
    fleet: Fleet, repo: Repo
) -> None:
    assert fleet.generate().returncode == 0
    fleet.write_config(supervisor={"http": f"127.0.0.1:{fleet.http_port}", "username": "admin",
                                   "password": "a-new-secret"})
    result = fleet.generate()
    assert result.returncode == 0, result.stderr
    assert "needs restart: supervisord reads [inet_http_server] only when it starts" in (
        result.stdout)
    again = fleet.generate()
    assert "needs restart" not in again.stdout
