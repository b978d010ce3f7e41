"""The worker daemon against real PostgreSQL and Redis: outages, reloads, secrets, overlaps."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
import simplejson as json

from collector import mailbox
from collector.demo import sandbox
from tests.helpers import Fleet, Repo, password_remote, proc_text, stop_process, wait_for
from tests.test_snapshot import add_slow_source

PASSWORD = "Sup3r-S3cret-pw!"


def force(fleet: Fleet, srvid: int, timeout: float = 5) -> dict[str, str]:
    """Ask a worker for a snapshot the way the control process does."""
    reply = f"{fleet.prefix}:reply:test{time.monotonic_ns()}"
    request = mailbox.seal(mailbox.fleet_key(fleet.directory),
                           {"command": "force_snapshot", "reply_to": reply})
    with fleet.redis() as client:
        client.rpush(f"{fleet.prefix}:commands:{srvid}", request)
        answer = client.blpop([reply], timeout=timeout)
    assert answer is not None, "the worker did not answer"
    return json.loads(answer[1])  # type: ignore[no-any-return]


def redis_values(client: redis.Redis) -> list[bytes | str]:
    """Every value held in Redis, whatever the type of its key."""
    values: list[bytes | str] = []
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"string":
            values.append(client.get(key) or b"")
        elif kind == b"hash":
            values += client.hgetall(key).values()
        elif kind == b"list":
            values += client.lrange(key, 0, -1)
    return values


def status_is(fleet: Fleet, srvid: int, status: str) -> bool:
    document = fleet.status(srvid)
    return document is not None and document["status"] == status


def test_remote_down_then_back_without_restart(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=50)
    srvid = repo.register(remote, alias="flaky")
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "a first snapshot")
    assert status_is(fleet, srvid, "running")
    remote.stop()
    wait_for(lambda: status_is(fleet, srvid, "no connection to remote server"), 6,
             "status 'no connection to remote server' within one period")
    # powa-web sees why, in powa_snapshot_metas.errors, at the next due time
    wait_for(lambda: any("Error connecting to remote server" in e for e in repo.errors(srvid)),
             8, "the connection error in the repository")
    assert worker.poll() is None
    count = repo.snapshots(srvid)
    remote.start()
    wait_for(lambda: repo.snapshots(srvid) > count, 20, "snapshots to resume")
    wait_for(lambda: status_is(fleet, srvid, "running"), 5, "status running again")
    document = fleet.status(srvid)
    assert document is not None and document["pid"] == worker.pid
    assert document["snapshots_ok"] >= 2
    assert worker.poll() is None


def test_remote_unreachable_at_start_keeps_the_worker_up(fleet: Fleet, repo: Repo) -> None:
    port = sandbox.free_port()
    repo.execute(
        "SELECT powa_register_server(hostname => '127.0.0.1', port => %s, alias => 'later',"
        " frequency => 5)", (port,)
    )
    srvid = int(repo.one("SELECT max(id) FROM powa_servers"))
    worker = fleet.start_worker(srvid)
    wait_for(lambda: status_is(fleet, srvid, "no connection to remote server"), 10, "status")
    time.sleep(3)
    assert worker.poll() is None
    assert "Traceback" not in fleet.log(srvid)


def test_repository_down_at_start_then_back(
    fleet: Fleet, repo: Repo
) -> None:
    srvid = repo.srvids[1]
    repo.due_in(srvid, 1, frequency=5)
    repo.cluster.stop()
    worker = fleet.start_worker(srvid)
    try:
        wait_for(lambda: status_is(fleet, srvid, "no connection to repository server"), 15,
                 "status 'no connection to repository server'")
        assert worker.poll() is None
    finally:
        repo.cluster.start()
    wait_for(lambda: repo.snapshots(srvid) >= 1, 40, "a snapshot once the repository is back")
    wait_for(lambda: status_is(fleet, srvid, "running"), 5, "status running")
    assert worker.poll() is None


def test_redis_down_snapshots_continue_and_status_comes_back(
    tmp_path: Path, repo: Repo
) -> None:
    redis_server = sandbox.RedisServer()
    redis_server.start()
    fleet = Fleet(tmp_path, repo, redis_server.url)
    fleet.write_config()
    srvid = repo.srvids[1]
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    try:
        wait_for(lambda: status_is(fleet, srvid, "running"), 15, "status in Redis")
        redis_server.stop()
        count = repo.snapshots(srvid)
        wait_for(lambda: repo.snapshots(srvid) >= count + 2, 20, "snapshots without Redis")
        assert worker.poll() is None
        redis_server.start()
        document = wait_for(lambda: fleet.status(srvid), 15, "status back in Redis")
        assert document["status"] == "running"
        assert document["pid"] == worker.pid
        assert document["snapshots_ok"] >= count + 2
    finally:
        stop_process(worker)
        redis_server.stop()
    assert "cannot write status to Redis" in fleet.log(srvid)
    assert "status written to Redis again" in fleet.log(srvid)



def test_password_never_leaks(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=50)
    password_remote(remote, PASSWORD)
    srvid = repo.register(remote, alias="secret", username="collector",
                          password=PASSWORD)
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "a snapshot with scram authentication")
    for name in ("cmdline", "environ"):
        assert PASSWORD not in proc_text(worker.pid, name)
    # a wrong password: the error is reported, the secrets are not
    wrong = "Wr0ng-" + PASSWORD
    repo.execute("UPDATE powa_servers SET password = %s WHERE id = %s", (wrong, srvid))
    worker.send_signal(signal.SIGHUP)
    wait_for(lambda: status_is(fleet, srvid, "no connection to remote server"), 15,
             "the authentication failure")
    wait_for(lambda: any("password authentication failed" in e for e in repo.errors(srvid)),
             10, "the error in the repository")
    once = fleet.once(srvid)
    assert once.returncode == 1
    assert "password authentication failed" in once.stderr
    stop_process(worker)
    with fleet.redis() as client:
        stored = b" ".join(v if isinstance(v, bytes) else v.encode() for v in redis_values(client))
    texts = {
        "log": fleet.log(srvid),
        "redis": stored.decode(),
        "repository errors": " ".join(repo.errors(srvid)),
        "--once output": once.stdout + once.stderr,
    }
    for where, text in texts.items():
        for secret in (PASSWORD, wrong):
            assert secret not in text, f"password found in {where}"
    assert "password authentication failed" in texts["log"]


def test_sighup_rereads_the_row_without_restart(
    fleet: Fleet, repo: Repo
) -> None:
    srvid = repo.srvids[2]
    repo.due_in(srvid, 4, frequency=60)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "a first snapshot")
    document = fleet.status(srvid)
    assert document is not None and document["frequency"] == 60
    repo.set_frequency(5, srvid)
    worker.send_signal(signal.SIGHUP)
    wait_for(lambda: (fleet.status(srvid) or {}).get("frequency") == 5, 5, "the new frequency")
    wait_for(lambda: repo.snapshots(srvid) >= 3, 15, "snapshots at the new frequency")
    assert fleet.status(srvid)["pid"] == worker.pid  # type: ignore[index]


def test_force_snapshot_answers_like_upstream(fleet: Fleet, repo: Repo) -> None:
    srvid = repo.srvids[2]
    # the scheduled snapshot is minutes away: only a forced one can come now
    repo.due_in(srvid, 250, frequency=300)
    fleet.start_worker(srvid)
    wait_for(lambda: fleet.status(srvid), 15, "the worker to start")
    answer = force(fleet, srvid)
    assert answer["status"] == "OK"
    assert answer["data"] in ("Snapshot in progress", "Snapshot will begin shortly")
    wait_for(lambda: repo.snapshots(srvid) >= 1, 10, "the forced snapshot")
    # the 10 s rule itself is tested with a clock in tests/unit/test_worker_parts.py
    assert force(fleet, srvid) == {"status": "ERROR",
                                   "data": "Last snapshot was less than 10s. ago"}


def slow_take_snapshot(repo: Repo, seconds: float) -> None:
    """powa_take_snapshot takes ``seconds`` longer: a slow repository."""
    repo.execute("ALTER FUNCTION powa_take_snapshot(integer) RENAME TO real_take_snapshot")
    repo.execute(
        "CREATE FUNCTION powa_take_snapshot(_srvid integer) RETURNS integer LANGUAGE plpgsql"
        f" AS $$ BEGIN PERFORM pg_sleep({seconds}); RETURN real_take_snapshot(_srvid); END $$"
    )


def test_snapshots_never_overlap_with_forced_wakeups_and_a_slow_repository(
    fleet: Fleet, repo: Repo
) -> None:
    srvid = repo.srvids[1]
    slow_take_snapshot(repo, 3)
    # each snapshot takes longer than the period
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    most = 0
    answers: list[str] = []
    stop = threading.Event()

    def forcing() -> None:
        while not stop.is_set():
            answers.append(force(fleet, srvid)["data"])
            time.sleep(0.3)

    thread = threading.Thread(target=forcing)
    wait_for(lambda: fleet.status(srvid), 15, "the worker to start")
    thread.start()
    deadline = time.monotonic() + 15
    once = None
    while time.monotonic() < deadline:
        sessions = [s for s in repo.worker_sessions(srvid) if s[0] != "idle"]
        most = max(most, len(sessions))
        if once is None and sessions:
            # a second process on the same server meanwhile: refused, not overlapped
            once = fleet.once(srvid)
        time.sleep(0.05)
    stop.set()
    thread.join()
    assert most == 1
    assert repo.snapshots(srvid) >= 3
    assert "A snapshot is already in progress" in answers
    assert once is not None and once.returncode == 1
    assert "another snapshot of server" in once.stderr
    assert worker.poll() is None
    assert repo.tmp_rows(srvid) == {}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sighup_while_the_repository_is_down_waits_quietly(fleet: Fleet, repo: Repo) -> None:
    srvid = repo.srvids[1]
    repo.due_in(srvid, 4, frequency=300)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "a first snapshot")
    repo.cluster.stop()
    try:
        worker.send_signal(signal.SIGHUP)
        wait_for(lambda: status_is(fleet, srvid, "no connection to repository server"), 10,
                 "the repository failure")
        before = cpu_seconds(worker.pid)
        time.sleep(4)
        # retrying with backoff, not spinning
        assert cpu_seconds(worker.pid) - before < 0.5
        assert worker.poll() is None
    finally:
        repo.cluster.start()
    wait_for(lambda: status_is(fleet, srvid, "running"), 40, "the row read again")
    assert fleet.status(srvid)["pid"] == worker.pid  # type: ignore[index]


def test_a_frozen_remote_cannot_stall_the_worker(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="frozen")
    add_slow_source(repo, remote, srvid, 2)
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    with remote.connect() as conn:
        # frozen in pg_sleep, where it holds no lock another snapshot would wait for
        backend = wait_for(lambda: conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND query LIKE '%%COPY (SELECT%%slow_src%%'",
            (f"powa-fleet worker {srvid}",),
        ).fetchone(), 20, "the worker's remote query")[0]
    # the remote backend stops answering, and cannot even be cancelled
    os.kill(backend, signal.SIGSTOP)
    try:
        wait_for(lambda: "dropping its connection" in fleet.log(srvid), 20,
                 "the watchdog to give up on the frozen backend")
        count = repo.snapshots(srvid)
        wait_for(lambda: repo.snapshots(srvid) > count, 20, "snapshots on a new connection")
        assert worker.poll() is None
    finally:
        os.kill(backend, signal.SIGCONT)


def test_a_remote_frozen_outside_a_snapshot_cannot_stall_the_worker(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=20)
    srvid = repo.register(remote, alias="frozen between snapshots")
    repo.due_in(srvid, 4, frequency=300)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: repo.snapshots(srvid) >= 1, 20, "a first snapshot")
    with remote.connect() as conn:
        backend = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"powa-fleet worker {srvid}",),
        ).fetchone()
    assert backend is not None
    os.kill(backend[0], signal.SIGSTOP)
    try:
        # SIGHUP reads the versions again, on the frozen connection
        worker.send_signal(signal.SIGHUP)
        wait_for(lambda: "dropping its connection" in fleet.log(srvid), 30,
                 "the watchdog to give up on the frozen backend")
    finally:
        os.kill(backend[0], signal.SIGCONT)
    # the worker goes on with a new connection
    repo.set_frequency(5, srvid)
    worker.send_signal(signal.SIGHUP)
    count = repo.snapshots(srvid)
    wait_for(lambda: repo.snapshots(srvid) > count, 20, "snapshots on a new connection")
    assert worker.poll() is None


def test_a_forged_or_replayed_command_is_ignored(fleet: Fleet, repo: Repo) -> None:
    srvid = repo.srvids[0]
    repo.due_in(srvid, 250, frequency=300)
    fleet.start_worker(srvid)
    wait_for(lambda: fleet.status(srvid), 15, "the worker to start")
    queue = f"{fleet.prefix}:commands:{srvid}"
    reply = f"{fleet.prefix}:reply:forged"
    plain = json.dumps({"command": "force_snapshot", "reply_to": reply})
    wrong_key = mailbox.seal(b"not the fleet's key", {"command": "force_snapshot",
                                                       "reply_to": reply})
    sealed = json.loads(mailbox.seal(mailbox.fleet_key(fleet.directory),
                                     {"command": "force_snapshot", "reply_to": reply}))
    body = json.loads(sealed["body"])
    # a captured request, its expiry pushed back: the signature no longer matches
    replayed = json.dumps({"body": json.dumps({**body, "expires": body["expires"] + 3600}),
                           "mac": sealed["mac"]})
    with fleet.redis() as client:
        for forged in (plain, wrong_key, replayed):
            client.rpush(queue, forged)
        assert client.blpop([reply], timeout=3) is None
    wait_for(lambda: fleet.log(srvid).count("ignored a command") == 3, 5, "three refusals")
    assert "bad signature" in fleet.log(srvid)
    assert repo.snapshots(srvid) == 0
    # the fleet's own control still gets its answers
    assert force(fleet, srvid)["status"] == "OK"


def test_two_workers_of_one_server_do_not_fight_over_its_status(fleet: Fleet, repo: Repo) -> None:
    srvid = repo.srvids[1]
    repo.due_in(srvid, 250, frequency=300)
    first = fleet.start_worker(srvid)
    wait_for(lambda: (fleet.status(srvid) or {}).get("pid") == first.pid, 15, "the first")
    second = fleet.start_worker(srvid, log=fleet.directory / "second.log")
    wait_for(lambda: "publishes its status" in (fleet.directory / "second.log").read_text(),
             15, "the second worker to stand aside")
    for _ in range(10):
        assert (fleet.status(srvid) or {}).get("pid") == first.pid
        time.sleep(0.3)
    # the first one stops: the second one takes the status over at once
    stop_process(first)
    wait_for(lambda: (fleet.status(srvid) or {}).get("pid") == second.pid, 15, "the second")


def test_a_server_collected_often_keeps_its_repository_session(
    fleet: Fleet, repo: Repo
) -> None:
    """Below [repository] keep_session_below sessions outlive snapshots; a dead one costs none."""
    srvid = repo.srvids[0]
    repo.set_frequency(5, srvid)

    def backends() -> list[int]:
        return [int(row[0]) for row in repo.all(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"powa-fleet worker {srvid}",))]

    worker = fleet.start_worker(srvid)
    try:
        wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "a first snapshot")
        kept = backends()
        # powa_take_snapshot renamed the session: it has its name back
        assert len(kept) == 1, repo.all("SELECT application_name FROM pg_stat_activity")
        count = repo.snapshots(srvid)
        wait_for(lambda: repo.snapshots(srvid) > count, 10, "the next snapshot")
        assert backends() == kept
        # ended between snapshots (a repository restart, idle_session_timeout): a new
        # session takes the next snapshot, which is not lost
        assert repo.one("SELECT pg_terminate_backend(%s)", (kept[0],)) is True
        count = repo.snapshots(srvid)
        wait_for(lambda: repo.snapshots(srvid) > count, 10, "a snapshot after the kill")
        assert repo.errors(srvid) == []
        assert len(backends()) == 1 and backends() != kept
        assert "snapshot failed" not in fleet.log(srvid)
    finally:
        assert stop_process(worker) == 0
    wait_for(lambda: not backends(), 10, "the kept session to end with the worker")


def test_a_server_collected_seldom_holds_no_repository_session_between_snapshots(
    fleet: Fleet, repo: Repo
) -> None:
    fleet.write_config(repository={"dsn": repo.dsn, "keep_session_below": "5"})
    srvid = repo.srvids[0]
    repo.set_frequency(5, srvid)
    worker = fleet.start_worker(srvid)
    try:
        wait_for(lambda: repo.snapshots(srvid) >= 1, 15, "a snapshot")
        wait_for(lambda: not repo.worker_sessions(srvid), 3, "no session between snapshots")
    finally:
        assert stop_process(worker) == 0
