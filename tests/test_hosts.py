"""Several collector hosts sharing one fleet: shares, one leader, hosts lost and back.

Fleet directories stand for hosts (``[fleet] host`` alpha, beta, gamma),
each with its own supervisord, sharing the test repository and a Redis of
their own.  Twelve servers, snapshotted every 20 s, are simulated by one
PostgreSQL cluster listening on twelve addresses.  A trigger on
``powa_snapshot_metas`` logs every snapshot stored, so that each test can
check the promises over its whole run: never two snapshots of a server
closer than half its period, never a gap longer than two periods, each
snapshot counted once.

A host is lost in two ways: killed whole (supervisord and everything under
it, SIGKILL), or cut off from the network: that host runs in a network
namespace of its own, joined to the others by a veth pair, whose link the
test sets down.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import simplejson as json

from collector import hosts, mailbox
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


@dataclass
class Servers:
    """The twelve shared servers, their cluster, and the Redis the hosts share."""

    srvids: list[int]
    cluster: sandbox.Cluster
    redis: sandbox.RedisServer


def share_servers(template: Path, sandbox_dir: Path, repo: Repo, addresses: tuple[str, ...],
                  redis_host: str = "127.0.0.1", redis_password: str | None = None) -> Servers:
    base = sandbox.clone(template, sandbox_dir / f"hosts{uuid.uuid4().hex[:8]}")
    cluster = sandbox.Cluster(base.datadir, base.port, addresses[0], addresses[1:])
    cluster.configure({"max_connections": "100"})
    with (cluster.datadir / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 10.213.0.0/16 trust\n")
    cluster.start()
    sandbox.create_workload(cluster, 20)
    with repo.cluster.connect() as conn:
        conn.execute("UPDATE powa_servers SET frequency = -1 WHERE id > 0")
        srvids = [sandbox.register_remote(conn, sandbox.Cluster(base.datadir, base.port, address),
                                          alias=f"shared {address}", frequency=PERIOD)
                  for address in addresses]
        conn.execute(_LOG)
    redis_server = sandbox.RedisServer(host=redis_host, password=redis_password)
    redis_server.start()
    return Servers(srvids, cluster, redis_server)


def drop_servers(servers: Servers) -> None:
    servers.redis.stop()
    servers.cluster.stop("immediate")
    shutil.rmtree(servers.cluster.datadir, ignore_errors=True)


@pytest.fixture
def shared(template: Path, sandbox_dir: Path, repo: Repo) -> Iterator[Servers]:
    """Twelve servers on one cluster (a loopback address each), the others set aside."""
    servers = share_servers(template, sandbox_dir, repo,
                            tuple(f"127.0.9.{i}" for i in range(1, SERVERS + 1)))
    yield servers
    drop_servers(servers)


def host_fleet(base: Path, fleet: Fleet, name: str, redis_url: str,
               repository_dsn: str | None = None) -> Fleet:
    directory = base / name
    directory.mkdir()
    other = Fleet(directory, fleet.repo, redis_url, prefix=fleet.prefix)
    sections: dict[str, dict[str, str]] = {"fleet": {"host": name, "heartbeat": "1"}}
    if repository_dsn:
        sections["repository"] = {"dsn": repository_dsn}
    other.write_config(**sections)
    # the fleet's command key, shared by its hosts like a cluster secret
    mailbox.fleet_key(fleet.directory)
    shutil.copy2(fleet.directory / mailbox.KEY_FILE, directory / mailbox.KEY_FILE)
    return other


def kill_host(member: Supervisord) -> None:
    """SIGKILL a host's supervisord and everything under it (its children have their own
    process groups): a machine gone at once."""
    sandbox.kill_tree(member.process.pid)
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


def assert_no_gap_nor_double(repo: Repo, srvids: list[int], slack: float = 5) -> None:
    """Over the whole test: spacing, no gap over two periods, each snapshot counted once."""
    assert_spacing(repo, srvids)
    for srvid, times in snapshots(repo).items():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps, default=0) <= 2 * PERIOD + slack, (srvid, gaps)
    with repo.cluster.connect() as conn:
        jumps = conn.execute(
            "SELECT srvid, seq - lag(seq) OVER (PARTITION BY srvid ORDER BY seq)"
            " FROM snapshot_log").fetchall()
    # coalesce_seq moved by one for each snapshot stored
    assert {jump for _, jump in jumps if jump is not None} <= {1}


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


def collector_host(fleet: Fleet, srvid: int) -> str | None:
    """The host named in server ``srvid``'s status document, while it is running there."""
    document = fleet.status(srvid)
    return document.get("host") if document and document.get("status") == "running" else None


@contextlib.contextmanager
def hosts_running(fleets: dict[str, Fleet],
                  wrappers: dict[str, tuple[str, ...]] | None = None
                  ) -> Iterator[dict[str, Supervisord]]:
    running: dict[str, Supervisord] = {}
    try:
        for name, member in fleets.items():
            assert member.generate().returncode == 0
            running[name] = start_supervisord(member, (wrappers or {}).get(name, ()))
        yield running
    finally:
        for host in running.values():
            host.stop()


def test_three_hosts_share_the_servers_and_take_over_a_lost_one(
    tmp_path: Path, fleet: Fleet, repo: Repo, shared: Servers
) -> None:
    srvids = shared.srvids
    fleets = {name: host_fleet(tmp_path, fleet, name, shared.redis.url) for name in NAMES}
    with hosts_running(fleets) as running:
        # each host soon runs exactly its share, the others' programs removed
        wait_for(lambda: share_applied(fleets, srvids), 60, "the shares applied")
        for name in NAMES:
            assert 2 <= len(programs(fleets[name])) <= 7
        # one leader answers, for every server of every host
        wait_all_running(repo)
        count, statuses = workers_status(repo)
        assert count == 1
        assert {int(s) for s in statuses} == set(srvids)
        # the operator's view: three live hosts, one leader, shares adding up
        view = fleets["alpha"].run("-m", "collector", "hosts", "--json", "-c",
                                   str(fleets["alpha"].cfg_path))
        assert view.returncode == 0, view.stderr
        lines = json.loads(view.stdout)
        assert [line["host"] for line in lines] == list(NAMES)
        assert sum(line["leader"] for line in lines) == 1
        assert sum(line["share"] for line in lines) == SERVERS
        started = time.time()
        wait_for(lambda: snapshotted_since(repo, srvids, started) == set(srvids),
                 2 * PERIOD + 10, "every server snapshotted")

        # beta dies whole (supervisord, control, workers): its share is taken over
        lost = set(programs(fleets["beta"]))
        kill_host(running.pop("beta"))
        killed = time.time()
        survivors = {name: fleets[name] for name in ("alpha", "gamma")}
        wait_for(lambda: share_applied(survivors, srvids), 30, "beta's share taken over")
        wait_for(lambda: snapshotted_since(repo, list(lost), killed) == lost,
                 2 * PERIOD, f"beta's servers {sorted(lost)} snapshotted within two periods")
        assert_spacing(repo, srvids)

        # beta comes back: its share moves back, without a double snapshot
        running["beta"] = start_supervisord(fleets["beta"])
        wait_for(lambda: share_applied(fleets, srvids), 60, "beta's share back")
        wait_for(lambda: all(collector_host(fleets["beta"], s) == "beta" for s in lost),
                 2 * PERIOD + 10, "beta's servers collected by beta again")
        back = time.time()
        wait_for(lambda: snapshotted_since(repo, list(lost), back) == lost,
                 2 * PERIOD, "beta's servers snapshotted by beta again")

        # Redis down for a while: every server keeps being snapshotted by its owner
        shared.redis.stop()
        down = time.time()
        time.sleep(PERIOD * 2)
        assert snapshotted_since(repo, srvids, down + PERIOD) == set(srvids)
        shared.redis.start()
        time.sleep(5)
        assert share_applied(fleets, srvids), "the shares moved because Redis was away"
        wait_all_running(repo)
        assert_no_gap_nor_double(repo, srvids)

        # FORCE_SNAPSHOT reaches the owner's worker, whichever control leads: its gate
        # answers (a snapshot under way or just taken is upstream's refusal)
        worker_answers = {"Snapshot will begin shortly", "Snapshot in progress",
                          "A snapshot is already in progress",
                          "Last snapshot was less than 10s. ago"}
        seen: list[object] = []

        def forced(srvid: int) -> bool:
            with Client(repo.dsn) as client:
                answers = client.ask("FORCE_SNAPSHOT", (str(srvid),), timeout=3)
            seen[:] = answers
            return len(answers) == 1 and answers[0].data in worker_answers

        for srvid in srvids:
            # a worker's command listener is back within its 10 s backoff after Redis was
            wait_for(functools.partial(forced, srvid), 15, f"server {srvid} forced")


# ---------------------------------------------------------------- a host on its own network
NS_ROOT = "10.213.0.1"
NS_HOST = "10.213.0.2"


@dataclass
class Namespace:
    name: str
    inside: str
    outside: str

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, timeout=10)

    @property
    def wrapper(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        self.run("ip", "link", "set", self.inside, "down")

    def heal(self) -> None:
        self.run("ip", "link", "set", self.inside, "up")
        self.run("ip", "route", "replace", "10.213.1.0/24", "via", NS_ROOT)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, timeout=10, capture_output=True)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    """A network namespace joined to this one by a veth pair: 10.213.0.2 inside, and
    10.213.0.1 plus the servers' 10.213.1.N outside."""
    tag = uuid.uuid4().hex[:6]
    space = Namespace(f"pf{tag}", f"pfi{tag}", f"pfo{tag}")
    try:
        _ip("netns", "add", space.name)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"network namespaces unavailable here: {exc}")
    try:
        _ip("link", "add", space.outside, "type", "veth", "peer", "name", space.inside)
        _ip("link", "set", space.inside, "netns", space.name)
        _ip("addr", "add", f"{NS_ROOT}/24", "dev", space.outside)
        for i in range(1, SERVERS + 1):
            _ip("addr", "add", f"10.213.1.{i}/32", "dev", space.outside)
        _ip("link", "set", space.outside, "up")
        space.run("ip", "addr", "add", f"{NS_HOST}/24", "dev", space.inside)
        space.run("ip", "link", "set", space.inside, "up")
        space.run("ip", "link", "set", "lo", "up")
        space.run("ip", "route", "add", "10.213.1.0/24", "via", NS_ROOT)
        yield space
    finally:
        subprocess.run(["ip", "link", "del", space.outside], check=False, timeout=10,
                       capture_output=True)
        subprocess.run(["ip", "netns", "del", space.name], check=False, timeout=10)


def test_a_host_cut_off_from_the_network_is_taken_over_and_comes_back(
    tmp_path: Path, template: Path, sandbox_dir: Path, fleet: Fleet, repo: Repo,
    namespace: Namespace,
) -> None:
    # the repository answers on the shared network too
    with (repo.cluster.datadir / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 10.213.0.0/16 trust\n")
    repo.cluster.stop()
    repo.cluster.aliases = (NS_ROOT,)
    repo.cluster.start()
    servers = share_servers(template, sandbox_dir, repo,
                            tuple(f"10.213.1.{i}" for i in range(1, SERVERS + 1)), NS_ROOT,
                            # off loopback, Redis must ask for a password (config check)
                            uuid.uuid4().hex)
    try:
        srvids = servers.srvids
        dsn = psycopg.conninfo.make_conninfo(repo.dsn, host=NS_ROOT)
        fleets = {name: host_fleet(tmp_path, fleet, name, servers.redis.url, dsn)
                  for name in NAMES}
        with hosts_running(fleets, {"beta": namespace.wrapper}):
            wait_for(lambda: share_applied(fleets, srvids), 60, "the shares applied")
            wait_all_running(repo)
            lost = set(programs(fleets["beta"]))
            assert lost

            # beta's link goes down: Redis and the repository are out of its reach
            namespace.cut()
            cut = time.time()
            survivors = {name: fleets[name] for name in ("alpha", "gamma")}
            wait_for(lambda: share_applied(survivors, srvids), 30, "beta's share taken over")
            wait_for(lambda: snapshotted_since(repo, list(lost), cut) == lost, 2 * PERIOD,
                     f"beta's servers {sorted(lost)} snapshotted within two periods")
            assert_spacing(repo, srvids)

            # the split heals: beta's share goes back to it, nothing twice
            namespace.heal()
            wait_for(lambda: share_applied(fleets, srvids), 60, "beta's share back")
            wait_for(lambda: all(collector_host(fleets["beta"], s) == "beta" for s in lost),
                     3 * PERIOD, "beta's servers collected by beta again")
            healed = time.time()
            wait_for(lambda: snapshotted_since(repo, list(lost), healed) == lost,
                     2 * PERIOD, "beta's servers snapshotted by beta again")
            assert_no_gap_nor_double(repo, srvids)
    finally:
        drop_servers(servers)
