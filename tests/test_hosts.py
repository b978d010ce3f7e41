"""Several collector hosts sharing one fleet: shares, one leader, a host lost and back.

Three fleet directories stand for three hosts (``[fleet] host`` alpha, beta,
gamma), each with its own supervisord, sharing the test repository and Redis.
Twelve servers, snapshotted every 20 s, are simulated by one PostgreSQL
cluster listening on twelve loopback addresses.  A trigger on
``powa_snapshot_metas`` logs every snapshot stored, so that the whole test
can be checked for the two promises: never two snapshots of a server closer
than half its period, never a gap longer than two periods.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import simplejson as json

from collector import hosts
from collector.cli.client import Client
from collector.demo import sandbox
from tests.conftest import Supervisord, start_supervisord
from tests.helpers import Fleet, Repo, wait_for

NAMES = ("alpha", "beta", "gamma")
SERVERS = 12
PERIOD = 20

_LOG = """
CREATE TABLE snapshot_log (srvid int, snapts timestamptz, seq bigint,
                           logged timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION log_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.coalesce_seq IS DISTINCT FROM OLD.coalesce_seq THEN
    INSERT INTO snapshot_log (srvid, snapts, seq) VALUES (NEW.srvid, NEW.snapts, NEW.coalesce_seq);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER log_snapshot AFTER UPDATE ON powa_snapshot_metas
  FOR EACH ROW EXECUTE FUNCTION log_snapshot();
"""


@pytest.fixture
def shared(template: Path, sandbox_dir: Path, repo: Repo) -> Iterator[list[int]]:
    """Twelve servers on one cluster (one loopback address each), the others set aside."""
    aliases = tuple(f"127.0.9.{i}" for i in range(1, SERVERS + 1))
    base = sandbox.clone(template, sandbox_dir / f"hosts{os.getpid()}")
    cluster = sandbox.Cluster(base.datadir, base.port, aliases[0], aliases[1:])
    cluster.configure({"max_connections": "100"})
    cluster.start()
    sandbox.create_workload(cluster, 20)
    with repo.cluster.connect() as conn:
        conn.execute("UPDATE powa_servers SET frequency = -1 WHERE id > 0")
        srvids = [sandbox.register_remote(conn, sandbox.Cluster(base.datadir, base.port, alias),
                                          alias=f"shared {alias}", frequency=PERIOD)
                  for alias in aliases]
        conn.execute(_LOG)
    yield srvids
    cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


def host_fleet(base: Path, fleet: Fleet, name: str) -> Fleet:
    directory = base / name
    directory.mkdir()
    other = Fleet(directory, fleet.repo, fleet.redis_url, prefix=fleet.prefix)
    other.write_config(fleet={"host": name, "heartbeat": "1"})
    # the fleet's command key, shared by its hosts like a cluster secret
    key = fleet.directory / ".mailbox.key"
    if key.exists():
        shutil.copy2(key, directory / ".mailbox.key")
    return other


def kill_host(member: Supervisord) -> None:
    """SIGKILL a host's supervisord and everything under it (its children have their own
    process groups): a machine gone at once."""
    supervisord = member.process.pid
    os.kill(supervisord, signal.SIGSTOP)  # no restart of what dies below
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [supervisord]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    member.process.wait(10)
    # left behind, as by a machine that died: the next start waits for a new one
    (member.fleet.directory / "supervisor.sock").unlink(missing_ok=True)


def programs(fleet: Fleet) -> set[int]:
    return {int(p.name[len("worker_"):-len(".conf")])
            for p in (fleet.directory / "workers_available").glob("worker_*.conf")}


def snapshots(repo: Repo) -> dict[int, list[float]]:
    found: dict[int, list[float]] = {}
    with repo.cluster.connect() as conn:
        for srvid, at in conn.execute(
                "SELECT srvid, extract(epoch FROM snapts)::float8 FROM snapshot_log"
                " ORDER BY srvid, snapts"):
            found.setdefault(int(srvid), []).append(float(at))
    return found


def assert_spacing(repo: Repo, srvids: list[int]) -> None:
    """No two snapshots of a server closer than half its period."""
    for srvid, times in snapshots(repo).items():
        if srvid in srvids:
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert all(gap >= PERIOD / 2 for gap in gaps), (srvid, gaps)


def snapshotted_since(repo: Repo, srvids: list[int], since: float) -> set[int]:
    return {s for s, times in snapshots(repo).items() if s in srvids and times[-1] > since}


def share_applied(fleets: dict[str, Fleet], srvids: list[int]) -> bool:
    live = sorted(fleets)
    return all(programs(fleet) == set(hosts.owned(srvids, live, name))
               for name, fleet in fleets.items())


def workers_status(repo: Repo) -> tuple[int, dict[str, str]]:
    """(answers received, statuses of the first) for one WORKERS_STATUS."""
    with Client(repo.dsn) as client:
        answers = client.ask("WORKERS_STATUS", (), timeout=2)
    return len(answers), (json.loads(answers[0].data) if answers else {})


def wait_all_running(repo: Repo, timeout: float = 60) -> None:
    """Every server listed by the leader's WORKERS_STATUS, and running."""
    seen: list[dict[str, str]] = [{}]

    def all_running() -> bool:
        seen[0] = workers_status(repo)[1]
        return set(seen[0].values()) == {"running"} and len(seen[0]) == SERVERS

    try:
        wait_for(all_running, timeout, "all running")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen[0]}") from None


def test_three_hosts_share_the_servers_and_take_over_a_lost_one(
    tmp_path: Path, fleet: Fleet, repo: Repo, shared: list[int]
) -> None:
    fleets = {name: host_fleet(tmp_path, fleet, name) for name in NAMES}
    running: dict[str, Supervisord] = {}
    try:
        for name, member in fleets.items():
            assert member.generate().returncode == 0
            running[name] = start_supervisord(member)
        # each host soon runs exactly its share, the others' programs removed
        wait_for(lambda: share_applied(fleets, shared), 60, "the shares applied")
        for name in NAMES:
            assert 2 <= len(programs(fleets[name])) <= 7
        # one leader answers, for every server of every host
        wait_all_running(repo)
        count, statuses = workers_status(repo)
        assert count == 1
        # the operator's view: three live hosts, one leader, shares adding up
        view = fleets["alpha"].run("-m", "collector", "hosts", "--json", "-c",
                                   str(fleets["alpha"].cfg_path))
        assert view.returncode == 0, view.stderr
        lines = json.loads(view.stdout)
        assert [line["host"] for line in lines] == list(NAMES)
        assert sum(line["leader"] for line in lines) == 1
        assert sum(line["share"] for line in lines) == SERVERS
        assert {int(s) for s in statuses} == set(shared)
        started = time.time()
        wait_for(lambda: snapshotted_since(repo, shared, started) == set(shared),
                 2 * PERIOD + 10, "every server snapshotted")

        # beta dies whole (supervisord, control, workers): its share is taken over
        lost = set(programs(fleets["beta"]))
        kill_host(running.pop("beta"))
        killed = time.time()
        survivors = {name: fleets[name] for name in ("alpha", "gamma")}
        wait_for(lambda: share_applied(survivors, shared), 30, "beta's share taken over")
        wait_for(lambda: snapshotted_since(repo, list(lost), killed) == lost,
                 2 * PERIOD, f"beta's servers {sorted(lost)} snapshotted within two periods")
        assert_spacing(repo, shared)

        # beta comes back: its share moves back, without a double snapshot
        running["beta"] = start_supervisord(fleets["beta"])
        wait_for(lambda: share_applied(fleets, shared), 60, "beta's share back")
        back = time.time()
        wait_for(lambda: snapshotted_since(repo, list(lost), back) == lost,
                 2 * PERIOD + 10, "beta's servers snapshotted by beta again")
        assert_spacing(repo, shared)
        # no gap over two periods on any server, over the whole test
        for srvid, times in snapshots(repo).items():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps, default=0) <= 2 * PERIOD + 5, (srvid, gaps)
        # each stored snapshot was counted once by PoWA (coalesce_seq moved by one)
        with repo.cluster.connect() as conn:
            jumps = conn.execute(
                "SELECT srvid, seq - lag(seq) OVER (PARTITION BY srvid ORDER BY seq)"
                " FROM snapshot_log").fetchall()
        assert {jump for _, jump in jumps if jump is not None} <= {1}
    finally:
        for host in running.values():
            host.stop()
