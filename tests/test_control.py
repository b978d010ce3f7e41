"""The control process: PoWA's protocol, answered like upstream, with real supervisord and Redis."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import string
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import simplejson as json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import __version__, config, hosts, keys
from collector.cli.client import Answer, Client
from collector.control.board import StatusBoard
from collector.control.liveboard import LiveBoard
from collector.demo import sandbox
from tests.conftest import Supervisord, start_supervisord
from tests.helpers import (
    PYTHON,
    ROOT,
    Fleet,
    Repo,
    permission_verdicts,
    polled_status,
    wait_for,
)

WORKERS = ("worker_1", "worker_2", "worker_3")


def ask(repo: Repo, command: str, *args: str, timeout: float = 1.0) -> Answer:
    """One request exactly like powa-web: its 1s timeout for WORKERS_STATUS."""
    with Client(repo.dsn) as client:
        answers = client.ask(command, args, timeout=timeout)
    assert len(answers) == 1, f"no answer to {command} {args}"
    return answers[0]


def answered(repo: Repo) -> bool:
    with Client(repo.dsn) as client:
        return bool(client.ask("WORKERS_STATUS", ("1",), timeout=1))


def workers_status(repo: Repo, *srvid: str) -> dict[str, str]:
    answer = ask(repo, "WORKERS_STATUS", *srvid)
    assert answer.status == "OK", answer
    return json.loads(answer.data)  # type: ignore[no-any-return]


@pytest.fixture
def running(fleet: Fleet, repo: Repo, supervisord: Supervisord) -> Supervisord:
    supervisord.wait_running("control", *WORKERS)
    wait_for(lambda: set(polled_status(repo.dsn).values()) == {"running"}, 20, "all running")
    return supervisord


def test_answers_like_upstream_to_a_powa_web_client(
    fleet: Fleet, repo: Repo, running: Supervisord
) -> None:
    assert workers_status(repo) == {"1": "running", "2": "running", "3": "running"}
    assert workers_status(repo, "2") == {"2": "running"}
    assert workers_status(repo, "42") == {}
    # only the first argument counts; a non-number means every server, as upstream
    assert workers_status(repo, "abc") == workers_status(repo)
    reload = ask(repo, "RELOAD", timeout=5)
    assert (reload.status, reload.data) == ("OK", "OK")
    bogus = ask(repo, "BOGUS")
    assert bogus.status == "UNKNOWN"
    assert bogus.data == 'Message "BOGUS" invalid, command ignored'
    refresh = ask(repo, "REFRESH_DB_CAT", "1", "0")
    assert refresh.status == "ERROR"
    assert "PoWA 5" in refresh.data
    malformed = ask(repo, "REFRESH_DB_CAT", "1", "2", "onlyone")
    assert "Caller asked for 2 db, but found 1" in malformed.data
    assert ask(repo, "FORCE_SNAPSHOT", "77").data == "Server id 77 not found"
    assert ask(repo, "FORCE_SNAPSHOT").data.startswith('Command "')


def test_force_snapshot_gives_a_new_snapshot_within_seconds(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    # the schedule puts the next snapshot minutes away
    repo.due_in(2, 200, frequency=300)
    supervisord.ctl("restart", "worker_2")
    supervisord.wait_running("control", "worker_2")
    wait_for(lambda: polled_status(repo.dsn, "2") == {"2": "running"}, 15, "worker_2 running")
    before = repo.one("SELECT snapts FROM powa_snapshot_metas WHERE srvid = 2")
    answer = ask(repo, "FORCE_SNAPSHOT", "2", timeout=3)
    assert answer.status == "OK", answer
    assert answer.data in ("Snapshot in progress", "Snapshot will begin shortly")
    wait_for(lambda: repo.one("SELECT snapts FROM powa_snapshot_metas WHERE srvid = 2") > before,
             5, "a new snapts")
    again = ask(repo, "FORCE_SNAPSHOT", "2", timeout=3)
    assert (again.status, again.data) == ("ERROR", "Last snapshot was less than 10s. ago")


def test_stopped_worker_and_unreachable_remote(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="down", frequency=5)
    assert fleet.generate().returncode == 0
    supervisord = start_supervisord(fleet)
    try:
        supervisord.wait_running("control", f"worker_{srvid}", *WORKERS)
        wait_for(lambda: polled_status(repo.dsn, str(srvid)) == {str(srvid): "running"}, 20,
                 "the new worker running")
        supervisord.ctl("stop", "worker_2")
        assert workers_status(repo, "2") == {"2": "stopped"}
        assert workers_status(repo)["2"] == "stopped"
        remote.stop()
        wait_for(lambda: polled_status(repo.dsn, str(srvid)) ==
                 {str(srvid): "no connection to remote server"}, 10, "the remote down")
        (fleet.directory / "workers_enabled" / "worker_1.conf").unlink()
        assert workers_status(repo, "1") == {"1": "disabled"}
        force = ask(repo, "FORCE_SNAPSHOT", "1")
        assert force.status == "ERROR" and "disabled" in force.data
        stopped = ask(repo, "FORCE_SNAPSHOT", "2")
        assert stopped.status == "ERROR" and "not running" in stopped.data
    finally:
        supervisord.stop()


def test_reload_adds_changes_and_removes_servers(
    fleet: Fleet, repo: Repo, running: Supervisord,
    cluster_factory: Callable[..., sandbox.Cluster],
) -> None:
    pids = {name: running.pid(name) for name in WORKERS}
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="added", frequency=5)
    reload = ask(repo, "RELOAD", timeout=10)
    assert (reload.status, reload.data) == ("OK", "OK")
    # answered when done, or after 0.5 s once the files are accepted (the rest goes on)
    wait_for(lambda: running.state(f"worker_{srvid}") in ("STARTING", "RUNNING"), 30,
             "the added server's program")
    wait_for(lambda: repo.snapshots(srvid) >= 1, 12, "the added server snapshotting")
    assert workers_status(repo, str(srvid)) == {str(srvid): "running"}
    assert {name: running.pid(name) for name in WORKERS} == pids
    # a changed row: that worker re-reads it, without a restart
    repo.set_frequency(7, 3)
    assert ask(repo, "RELOAD", timeout=10).status == "OK"
    wait_for(lambda: (fleet.status(3) or {}).get("frequency") == 7, 5, "frequency 7 adopted")
    assert {name: running.pid(name) for name in WORKERS} == pids
    assert "SIGHUP: reading the server row again" not in (
        fleet.directory / "logs" / "worker_1.log").read_text()
    # a deleted server: its program goes
    repo.execute("SELECT powa_delete_and_purge_server(%s)", (srvid,))
    assert ask(repo, "RELOAD", timeout=10).status == "OK"
    wait_for(lambda: running.state(f"worker_{srvid}") is None, 30, "its program removed")
    assert str(srvid) not in workers_status(repo)
    # SIGHUP to the control process is a RELOAD too
    repo.set_frequency(9, 3)
    running.rpc.signal("control", "HUP")
    wait_for(lambda: (fleet.status(3) or {}).get("frequency") == 9, 10, "frequency 9 adopted")


def test_permission_denied_for_roles_that_cannot_signal(
    repo: Repo, running: Supervisord
) -> None:
    repo.execute("CREATE ROLE viewer LOGIN")
    repo.execute("CREATE ROLE operator LOGIN IN ROLE pg_signal_backend")
    for role, expected in (("viewer", "Permission denied"), ("operator", None)):
        with Client(repo.cluster.dsn(user=role)) as client:
            answers = client.ask("WORKERS_STATUS", (), timeout=2)
            reload = client.ask("RELOAD", (), timeout=5)
        assert len(answers) == 1
        if expected:
            assert (answers[0].status, answers[0].data) == ("ERROR", expected)
            assert (reload[0].status, reload[0].data) == ("ERROR", expected)
        else:
            assert answers[0].status == "OK"
            assert reload[0].status == "OK"


def test_admission_tells_allowed_refused_and_gone_senders(repo: Repo) -> None:
    # a sender gone before its request is read gets no answer and no refusal logged
    assert permission_verdicts(repo, "pg_signal_backend") == {
        "postgres": True, "viewer": False, "allowed": True, "gone": None}


def test_listening_again_after_the_connection_is_killed(
    repo: Repo, running: Supervisord
) -> None:
    # powa-web's own test for a running collector (powa/config.py, 4.1 and 5.x)
    pid = repo.one("SELECT pid FROM pg_stat_activity"
                   " WHERE application_name LIKE 'PoWA collector - main thread (%%'")
    assert repo.one("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                    (pid,)).endswith(f"(powa-fleet {__version__})")
    assert repo.one("SELECT pg_terminate_backend(%s)", (pid,)) is True
    def listening_again() -> bool:
        # another backend than the killed one (which may be listed for a moment), answering
        return bool(repo.one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'PoWA collector%%'"
            " AND pid <> %s", (pid,)
        )) and answered(repo)

    wait_for(listening_again, 15, "the control to listen again")
    assert workers_status(repo, "1") == {"1": "running"}
    log = (running.fleet.directory / "logs" / "control.log").read_text()
    assert "notifications sent meanwhile are lost" in log


PAYLOAD_TEXT = st.text(
    alphabet=st.sampled_from([*string.printable, "é", "漢", "☃", "\u00a0", "%", "{", "}"]),
    max_size=200,
)
PAYLOADS = st.one_of(
    PAYLOAD_TEXT,
    st.builds(lambda c, ch, a: f"{c} {ch} {a}",
              st.sampled_from(["WORKERS_STATUS", "RELOAD", "FORCE_SNAPSHOT", "REFRESH_DB_CAT",
                               "X", ""]),
              st.one_of(PAYLOAD_TEXT, st.sampled_from(
                  ['x"; DROP TABLE canary; --', "a" * 64, "é" * 40, "-", 'q"q', "%s"])),
              PAYLOAD_TEXT),
    st.just("WORKERS_STATUS " + "x" * 7900),
    st.just("FORCE_SNAPSHOT r1 " + "9" * 7000),
)


def test_arbitrary_payloads_never_stop_the_control(
    repo: Repo, running: Supervisord
) -> None:
    repo.execute("CREATE TABLE canary (x int)")
    pid = running.pid("control")
    with psycopg.connect(repo.dsn, autocommit=True) as sender:

        @settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(payloads=st.lists(PAYLOADS, min_size=1, max_size=10))
        def fuzz(payloads: list[str]) -> None:
            for payload in payloads:
                sender.execute("SELECT pg_notify('powa_collector', %s)", (payload,))

        fuzz()
    # still answering well-formed requests, same process, nothing else executed
    wait_for(lambda: answered(repo), 60, "an answer")
    assert workers_status(repo, "1") == {"1": "running"}
    assert running.pid("control") == pid
    assert repo.one("SELECT count(*) FROM canary") == 0
    assert repo.one("SELECT count(*) FROM pg_class WHERE relname = 'canary'") == 1
    log = (running.fleet.directory / "logs" / "control.log").read_text()
    assert "Traceback" not in log
    assert set(workers_status(repo).values()) == {"running"}


def test_sigterm_stops_the_control(repo: Repo, running: Supervisord) -> None:
    assert "control: stopped" in running.ctl("stop", "control").stdout
    assert running.state("control") == "STOPPED"
    assert not repo.one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'PoWA collector%%'"
    )
    with Client(repo.dsn) as client:
        assert client.ask("WORKERS_STATUS", (), timeout=1) == []


def test_live_board_follows_the_fleet_without_polling(
    fleet: Fleet, repo: Repo, running: Supervisord, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config.load(fleet.cfg_path)
    with fleet.redis() as client:
        programs = client.hgetall(keys.programs_key(fleet.prefix, cfg.fleet.host))
        assert {name.decode() for name in programs} >= {"control", "programs", "spawner", *WORKERS}
        assert json.loads(programs[b"worker_1"])["state"] == "RUNNING"
    direct = StatusBoard(cfg)
    # the event listener ticks every 5 s: 7 s without a word means it is gone
    live = LiveBoard(direct, alive_ttl=7)
    live.start()
    try:
        wait_for(live.statuses, 10, "the live board to load")
        assert live.statuses() == direct.statuses() == {1: "running", 2: "running", 3: "running"}
        running.ctl("stop", "worker_2")
        wait_for(lambda: (live.statuses() or {}).get(2) == "stopped", 5, "worker_2 stopped")
        running.ctl("start", "worker_2")
        wait_for(lambda: (live.statuses() or {}).get(2) == "running", 10, "worker_2 back")
        # a worker that dies without a word: supervisord's event says so at once
        os.kill(running.pid("worker_3"), signal.SIGKILL)
        wait_for(lambda: (live.statuses() or {}).get(3) != "running", 5, "worker_3 gone")
        wait_for(lambda: (live.statuses() or {}).get(3) == "running", 15, "worker_3 restarted")
        # the event listener gone silent: the live picture is not trusted any more
        caplog.set_level(logging.INFO, logger="collector.control.liveboard")
        before = len(caplog.records)
        running.ctl("stop", "programs")
        wait_for(lambda: live.statuses() is None, 15, "the live board to distrust itself")
        # said once, with the reason, and once when it is whole again
        live.statuses()
        said = [r.getMessage() for r in caplog.records[before:]
                if "live status board" in r.getMessage()]
        assert len(said) == 1 and "no word from the event listener for" in said[0], said
        running.ctl("start", "programs")
        wait_for(live.statuses, 15, "the live board to trust itself again")
        said = [r.getMessage() for r in caplog.records[before:]
                if "live status board" in r.getMessage()]
        assert said[1:] == ["live status board whole again"], said
    finally:
        live.close()
        direct.close()


def test_the_control_never_serves_its_own_answers(repo: Repo, running: Supervisord) -> None:
    """An answer on ``powa_collector`` itself would come back with the control's own pid.

    Parsed as a request, ``RELOAD ERROR Permission denied`` is a RELOAD from a
    privileged backend answering on channel ``ERROR``: a role without the right
    could have the fleet reloaded, or read its status, that way.
    """
    repo.execute("CREATE ROLE outsider LOGIN")
    with psycopg.connect(repo.cluster.dsn(user="outsider"), autocommit=True) as conn:
        conn.execute('LISTEN "ERROR"')
        conn.execute("LISTEN powa_collector")
        conn.execute("NOTIFY powa_collector, 'WORKERS_STATUS powa_collector'")
        seen = [(n.channel, n.payload) for n in conn.notifies(timeout=3)]
    assert ("powa_collector", "WORKERS_STATUS powa_collector") in seen
    # refused without an answer: nothing on powa_collector, nothing on ERROR
    assert [s for s in seen if s != ("powa_collector", "WORKERS_STATUS powa_collector")] == []
    assert answered(repo)


def test_a_removed_program_is_not_reported_stopped(
    fleet: Fleet, repo: Repo, running: Supervisord
) -> None:
    assert "worker_2: stopped and removed" in fleet.generate("--disable", "2").stdout
    wait_for(lambda: polled_status(repo.dsn).get("2") == "disabled", 10, "worker_2 disabled")
    # linked again by hand, not applied yet: supervisord does not know the program
    link = fleet.directory / "workers_enabled" / "worker_2.conf"
    link.symlink_to("../workers_available/worker_2.conf")
    wait_for(lambda: polled_status(repo.dsn).get("2", "").startswith("not loaded in supervisord"),
             10, "worker_2 reported as not loaded")
    assert ask(repo, "RELOAD", timeout=10).status == "OK"
    wait_for(lambda: polled_status(repo.dsn).get("2") == "running", 20, "worker_2 running again")


# ---------------------------------------------------------------- RELOAD off the NOTIFY loop
def send(repo: Repo, command: str, channel: str) -> psycopg.Connection[tuple[object, ...]]:
    """A session that asked ``command`` and listens on ``channel`` for the answer."""
    conn = psycopg.connect(repo.dsn, autocommit=True)
    conn.execute(f'LISTEN "{channel}"')
    conn.execute("SELECT pg_notify('powa_collector', %s)", (f"{command} {channel} ",))
    return conn


def answer_on(conn: psycopg.Connection[tuple[object, ...]], timeout: float) -> str | None:
    for notify in conn.notifies(timeout=timeout):
        return notify.payload
    return None


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """supervisord frozen: every XML-RPC call to it hangs until it is thawed."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_status_answered_while_a_reload_waits_and_reloads_queue(
    repo: Repo, running: Supervisord
) -> None:
    log = running.fleet.directory / "logs" / "control.log"
    done_before = log.read_text().count("reload done")
    with frozen(running.process.pid):
        first = send(repo, "RELOAD", "first")
        # the reload thread is now blocked on supervisord; a second one queues
        time.sleep(0.5)
        second = send(repo, "RELOAD", "second")
        with Client(repo.dsn) as client:
            answers = client.ask("WORKERS_STATUS", (), timeout=1)
        assert answers, "WORKERS_STATUS not answered during a reload"
        assert answers[0].status == "OK"
        assert set(json.loads(answers[0].data)) == {"1", "2", "3"}
        # the first is answered while its work waits for supervisord (it goes on in
        # the background); the second waits for its own run, queued behind
        assert answer_on(first, 5) == "RELOAD OK OK"
        assert answer_on(second, 1) is None
        assert log.read_text().count("reload done") == done_before
    # thawed: the queued request is served by a second reload
    assert answer_on(second, 30) == "RELOAD OK OK"
    first.close()
    second.close()
    wait_for(lambda: log.read_text().count("reload done") == done_before + 2, 10,
             "two reloads done")
    assert set(polled_status(repo.dsn).values()) == {"running"}


def test_sigterm_stops_the_control_in_the_middle_of_a_reload(
    repo: Repo, running: Supervisord
) -> None:
    control = running.pid("control")
    with frozen(running.process.pid):
        asked = send(repo, "RELOAD", "stuck")
        time.sleep(0.5)
        os.kill(control, signal.SIGTERM)
        started = time.monotonic()
        # the control's own grace is 5 s, supervisord's stopwaitsecs for it is 20 s
        wait_for(lambda: not _alive(control), 10, "the control to exit")
        assert time.monotonic() - started < 10
        asked.close()
    # its last words reach the log once supervisord reads its pipe again
    log = running.fleet.directory / "logs" / "control.log"
    wait_for(lambda: log.read_text().splitlines()[-1].endswith("collector.control: stopped"),
             10, "the control's last log line")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waits for supervisord (frozen) to reap it: it runs no more
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_a_broken_configuration_is_refused_by_reload_and_nothing_restarts(
    fleet: Fleet, repo: Repo, running: Supervisord
) -> None:
    pids = {name: running.pid(name) for name in ("control", *WORKERS)}
    good = fleet.cfg_path.read_text()
    broken = good.replace("[collector]\n", "[collector]\nuse_server_alias = flase\n")
    fleet.cfg_path.write_text(broken)
    answer = ask(repo, "RELOAD", timeout=10)
    assert answer.status == "ERROR"
    assert answer.data.startswith("configuration refused, nothing changed:")
    assert "use_server_alias" in answer.data
    os.kill(pids["control"], signal.SIGHUP)
    time.sleep(1)
    assert {name: running.pid(name) for name in pids} == pids
    assert set(workers_status(repo).values()) == {"running"}
    log = (fleet.directory / "logs" / "control.log").read_text()
    assert log.count("configuration refused") >= 2
    fleet.cfg_path.write_text(good)
    assert ask(repo, "RELOAD", timeout=10).status == "OK"


def second_fleet(fleet: Fleet, name: str, prefix: str) -> Fleet:
    """Another fleet directory on the same repository and Redis."""
    other = Fleet(fleet.directory.parent / name, fleet.repo, fleet.redis_url, prefix=prefix)
    other.directory.mkdir()
    other.write_config()
    return other


def start_control(fleet: Fleet, log: Path) -> subprocess.Popen[bytes]:
    """A control process of ``fleet`` outside supervisord, logging to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "collector.control", "-c", str(fleet.cfg_path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )


def test_one_collector_per_repository(fleet: Fleet, repo: Repo, running: Supervisord) -> None:
    other = second_fleet(fleet, "other-fleet", "other")
    log = other.directory / "control.log"
    control = start_control(other, log)
    try:
        wait_for(lambda: "not serving" in log.read_text(), 20, "the second control to refuse")
        text = log.read_text()
        assert "another powa-fleet control serves this repository: pid" in text
        assert "from 127.0.0.1" in text
        # powa-web still gets one answer per request, from the first fleet
        with psycopg.connect(repo.dsn, autocommit=True) as conn:
            conn.execute("LISTEN once")
            conn.execute("NOTIFY powa_collector, 'WORKERS_STATUS once'")
            answers = list(conn.notifies(timeout=2))
        assert len(answers) == 1
        assert control.poll() is None, "a refused control waits, it does not exit"
    finally:
        control.terminate()
        control.wait(10)


def test_upstream_collector_on_the_repository_is_refused(fleet: Fleet, repo: Repo) -> None:
    with psycopg.connect(repo.dsn, autocommit=True,
                         application_name="PoWA collector - main thread (1.3.2)"):
        log = fleet.directory / "control.log"
        control = start_control(fleet, log)
        try:
            wait_for(lambda: "not serving" in log.read_text(), 20, "the control to refuse")
            assert ("another collector serves this repository: 'PoWA collector - main thread"
                    " (1.3.2)'") in log.read_text()
        finally:
            control.terminate()
            control.wait(10)


def test_one_fleet_per_host_name_on_a_redis_prefix(fleet: Fleet, repo: Repo) -> None:
    first = hosts.Membership(config.load(fleet.cfg_path), fleet.redis())
    other = second_fleet(fleet, "same-prefix", fleet.prefix)
    second = hosts.Membership(config.load(other.cfg_path), fleet.redis())
    assert first.beat() is None
    # another directory under the same (default) host name: refused
    refused = second.beat()
    assert refused is not None
    assert f"announced by the fleet in '{fleet.directory}'" in refused
    assert set(first.live()) == {first.me}
    # the same fleet restarting (another process) takes its own name back
    assert hosts.Membership(config.load(fleet.cfg_path), fleet.redis()).beat() is None


def test_a_flood_from_a_role_without_rights_does_not_silence_the_control(
    repo: Repo, running: Supervisord
) -> None:
    repo.execute("CREATE ROLE flooder LOGIN")
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        with psycopg.connect(repo.cluster.dsn(user="flooder"), autocommit=True) as conn:
            while not stop.is_set() and sent[0] < 40_000:
                conn.execute("NOTIFY powa_collector, 'WORKERS_STATUS flood'")
                sent[0] += 1

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        wait_for(lambda: sent[0] > 2000, 30, "the flood to start")
        # powa-web's own timeout for WORKERS_STATUS is 1 s: every request answered in it
        for _ in range(10):
            assert workers_status(repo) == {"1": "running", "2": "running", "3": "running"}
        assert thread.is_alive(), "the flood ended before the probes"
    finally:
        stop.set()
        thread.join()
    log = (running.fleet.directory / "logs" / "control.log").read_text()
    assert "requests from pid" in log and "refused: its role may not signal backends" in log


def test_a_fatal_worker_comes_back_without_an_operator(fleet: Fleet, repo: Repo) -> None:
    fleet.write_config(collector={"restart_fatal_after": "2"})
    assert fleet.generate().returncode == 0
    supervisord = start_supervisord(fleet)
    try:
        supervisord.wait_running("control", *WORKERS)
        wait_for(lambda: set(polled_status(repo.dsn).values()) == {"running"}, 30, "all running")
        good = fleet.cfg_path.read_text()
        # a deploy gone wrong for a moment: the worker dies at start, three times
        fleet.cfg_path.write_text(good.replace("[collector]\n", "[collector]\nbogus = 1\n"))
        supervisord.ctl("stop", "worker_2")
        supervisord.ctl("start", "worker_2")
        wait_for(lambda: supervisord.state("worker_2") == "FATAL", 30, "worker_2 FATAL")
        assert "[collector] bogus: unknown key" in (
            fleet.directory / "logs" / "worker_2.log").read_text()
        fleet.cfg_path.write_text(good)
        wait_for(lambda: supervisord.state("worker_2") == "RUNNING", 30, "worker_2 healed")
        wait_for(lambda: polled_status(repo.dsn, "2") == {"2": "running"}, 20, "worker_2 running")
        log = (fleet.directory / "logs" / "control.log").read_text()
        assert "worker_2 is FATAL" in log
        assert "worker_2: starting it again" in log
    finally:
        supervisord.stop()
