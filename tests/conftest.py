"""Session fixtures: real PostgreSQL 15 clusters with PoWA, a real redis-server, real supervisord.

Clusters are copies of one template made by initdb once per session; every
test that writes to the repository gets a fresh repository cluster (a copy
takes a fraction of a second) with the three sandbox remotes registered.
Everything listens on 127.0.0.1 on free ports and is removed afterwards.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from collector.demo import sandbox
from collector.fleet.supervisord import Supervisor
from tests import powa5
from tests.helpers import PYTHON, ROOT, Fleet, Repo, polled_status, wait_for

#: statements created on the first remote; the others get a light workload
BIG_WORKLOAD = 3000
_names = itertools.count()


@pytest.fixture(scope="session")
def sandbox_dir() -> Iterator[Path]:
    with sandbox.workspace("powa-fleet-tests-") as path:
        yield path


@pytest.fixture(scope="session")
def template(sandbox_dir: Path) -> Path:
    return sandbox.make_template(sandbox_dir)


def new_cluster(template: Path, sandbox_dir: Path, kind: str) -> sandbox.Cluster:
    cluster = sandbox.clone(template, sandbox_dir / f"{kind}{next(_names)}")
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def remotes(template: Path, sandbox_dir: Path) -> Iterator[list[sandbox.Cluster]]:
    clusters = [new_cluster(template, sandbox_dir, "remote") for _ in range(3)]
    sandbox.create_workload(clusters[0], BIG_WORKLOAD)
    for cluster in clusters[1:]:
        sandbox.create_workload(cluster, 100)
    yield clusters
    for cluster in clusters:
        cluster.stop("immediate")


@pytest.fixture
def cluster_factory(template: Path, sandbox_dir: Path) -> Iterator[object]:
    """Make extra clusters for one test (a remote to break, to stop...)."""
    made: list[sandbox.Cluster] = []

    def make(workload: int = 50) -> sandbox.Cluster:
        cluster = new_cluster(template, sandbox_dir, "extra")
        made.append(cluster)
        if workload:
            sandbox.create_workload(cluster, workload)
        return cluster

    yield make
    for cluster in made:
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


@pytest.fixture
def repo(template: Path, sandbox_dir: Path, remotes: list[sandbox.Cluster]) -> Iterator[Repo]:
    cluster = new_cluster(template, sandbox_dir, "repo")
    with cluster.connect() as conn:
        srvids = [
            sandbox.register_remote(conn, remote, alias=f"remote {i}", frequency=300)
            for i, remote in enumerate(remotes, 1)
        ]
    yield Repo(cluster, srvids)
    cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[sandbox.RedisServer]:
    server = sandbox.RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fleet(tmp_path: Path, repo: Repo, redis_server: sandbox.RedisServer) -> Iterator[Fleet]:
    directory = tmp_path / "fleet"
    directory.mkdir()
    fleet = Fleet(directory, repo, redis_server.url)
    fleet.write_config()
    yield fleet
    fleet.stop_all()


@dataclass
class Supervisord:
    fleet: Fleet
    process: subprocess.Popen[bytes]

    @property
    def rpc(self) -> Supervisor:
        return Supervisor(self.fleet.directory / "supervisor.sock")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(PYTHON).parent / "supervisorctl"), "-c",
             str(self.fleet.directory / "supervisord.conf"), *args],
            capture_output=True, text=True, timeout=120, check=False,
        )

    def state(self, name: str) -> str | None:
        info = self.rpc.process(name)
        return None if info is None else str(info["statename"])

    def pid(self, name: str) -> int:
        info = self.rpc.process(name)
        assert info is not None, name
        return int(info["pid"])

    def wait_running(self, *names: str, timeout: float = 30) -> None:
        for name in names:
            wait_for(partial(self.is_running, name), timeout, f"{name} RUNNING")

    def is_running(self, name: str) -> bool:
        return self.state(name) == "RUNNING"

    def stop(self) -> None:
        sandbox.terminate(self.process, 90)


def start_supervisord(fleet: Fleet, wrapper: tuple[str, ...] = ()) -> Supervisord:
    """supervisord of ``fleet``, run through ``wrapper`` (``ip netns exec NS``) if given."""
    log = (fleet.directory / "supervisord.out").open("ab")
    process = subprocess.Popen(
        [*wrapper, str(Path(PYTHON).parent / "supervisord"), "-n", "-c",
         str(fleet.directory / "supervisord.conf")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        # as the demo and the systemd unit do: supervisord -n keeps its caller's umask
        umask=0o077,
    )
    log.close()
    running = Supervisord(fleet, process)
    wait_for(lambda: (fleet.directory / "supervisor.sock").exists() or process.poll() is not None,
             30, "supervisord socket")
    assert process.poll() is None, (fleet.directory / "supervisord.out").read_text()
    wait_for(lambda: running.rpc.state() == "RUNNING", 30, "supervisord RUNNING")
    return running


@pytest.fixture
def supervisord(fleet: Fleet) -> Iterator[Supervisord]:
    """supervisord running the generated fleet of the test's repository."""
    result = fleet.generate()
    assert result.returncode == 0, result.stderr
    running = start_supervisord(fleet)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _slow_test_report(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    if elapsed > 60:
        print(f"\n{request.node.nodeid} took {elapsed:.0f}s")


# ---------------------------------------------------------------- PoWA 5 (PostgreSQL 17)
#: statements of the PoWA 5 remotes' workload (each also has a second database)
POWA5_WORKLOAD = 300


@pytest.fixture(scope="session")
def powa5_install() -> sandbox.PgInstall:
    """PostgreSQL 17 + PoWA 5: native on Debian 13, else the tree of `make powa5`."""
    return sandbox.powa5()


@pytest.fixture(scope="session")
def powa5_dir(powa5_install: sandbox.PgInstall) -> Iterator[Path]:
    with sandbox.workspace("powa-fleet-tests5-", powa5_install) as path:
        yield path


@pytest.fixture(scope="session")
def powa5_template(powa5_install: sandbox.PgInstall, powa5_dir: Path) -> Path:
    return sandbox.make_template(powa5_dir, powa5_install)


def new_powa5_cluster(install: sandbox.PgInstall, template: Path, base: Path,
                      kind: str) -> sandbox.Cluster:
    cluster = sandbox.clone(template, base / f"{kind}{next(_names)}", install=install)
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def powa5_remotes(
    powa5_install: sandbox.PgInstall, powa5_template: Path, powa5_dir: Path
) -> Iterator[list[sandbox.Cluster]]:
    """Two PoWA 5 remotes with the same workload (one for us, one for upstream)."""
    clusters = [new_powa5_cluster(powa5_install, powa5_template, powa5_dir, "remote5")
                for _ in range(2)]
    for cluster in clusters:
        powa5.create_workload(cluster, POWA5_WORKLOAD)
    yield clusters
    for cluster in clusters:
        cluster.stop("immediate")


@pytest.fixture
def powa5_cluster_factory(
    powa5_install: sandbox.PgInstall, powa5_template: Path, powa5_dir: Path
) -> Iterator[object]:
    """Extra PoWA 5 clusters for one test, removed afterwards."""
    made: list[sandbox.Cluster] = []

    def make() -> sandbox.Cluster:
        cluster = new_powa5_cluster(powa5_install, powa5_template, powa5_dir, "extra5")
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


@pytest.fixture
def powa5_repo(
    powa5_install: sandbox.PgInstall, powa5_template: Path, powa5_dir: Path,
    powa5_remotes: list[sandbox.Cluster],
) -> Iterator[Repo]:
    """A fresh PoWA 5 repository with both PoWA 5 remotes registered (srvids 1 and 2)."""
    cluster = new_powa5_cluster(powa5_install, powa5_template, powa5_dir, "repo5")
    with cluster.connect() as conn:
        srvids = [
            sandbox.register_remote(conn, remote, alias=f"remote5 {i}", frequency=300)
            for i, remote in enumerate(powa5_remotes, 1)
        ]
    yield Repo(cluster, srvids)
    cluster.stop("immediate")
    shutil.rmtree(cluster.datadir, ignore_errors=True)


@pytest.fixture
def powa5_fleet(
    tmp_path: Path, powa5_repo: Repo, redis_server: sandbox.RedisServer
) -> Iterator[Fleet]:
    directory = tmp_path / "fleet5"
    directory.mkdir()
    fleet = Fleet(directory, powa5_repo, redis_server.url)
    fleet.write_config()
    yield fleet
    fleet.stop_all()


def wait_all_running(supervisord: Supervisord, repo: Repo) -> None:
    """The control and every worker of ``repo`` started, each worker ``running``."""
    supervisord.wait_running("control", *(f"worker_{srvid}" for srvid in repo.srvids))
    wait_for(lambda: polled_status(repo.dsn) == {str(s): "running" for s in repo.srvids}, 30,
             "every worker running")


@pytest.fixture
def running5(powa5_fleet: Fleet, powa5_repo: Repo) -> Iterator[Supervisord]:
    """A PoWA 5 fleet under supervisord, snapshots minutes away (FORCE_SNAPSHOT is then
    accepted, and the test says when they happen)."""
    for srvid in powa5_repo.srvids:
        powa5_repo.due_in(srvid, 250, frequency=300)
    assert powa5_fleet.generate().returncode == 0
    supervisord = start_supervisord(powa5_fleet)
    try:
        wait_all_running(supervisord, powa5_repo)
        yield supervisord
    finally:
        supervisord.stop()
