"""One PoWA 5 snapshot of a remote with 1, 20 and 100 databases: powa-fleet against upstream.

    .venv/bin/python -m benchmarks.powa5_bench [--databases 1,20,100] [--rounds N]

PostgreSQL 17 + PoWA 5.0.2 (``sandbox.powa5()``: native packages, or the tree
of ``make powa5``).  One remote per size, with N user databases (the powa
database and N - 1 copies of a database of 5 tables with an index each),
plus ``postgres`` and ``template1`` as every cluster has; it listens on two
loopback addresses, registered as two servers of one repository: one
collected by powa-fleet's snapshot code, the other by upstream
powa-collector 1.3.2's own worker code (its process, its persistent remote
connection as in its daemon), taking turns going first.

Per snapshot: wall time, CPU time of the collector process (user + system,
the snapshot only), and sessions opened on the remote and on the repository
(counted at the driver's ``connect``).  "first" reads every database's
catalogs: the median of the first snapshot and of ``--firsts - 1`` more
after every database's ``last_refresh`` is forgotten (as REFRESH_DB_CAT of
all databases does), so that one noisy sample, or going second into the
same repository, does not decide; "next" the median of the following
rounds (db modules only, catalogs are refreshed yearly).  In every round
the two collectors take turns going first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import simplejson as json
from psycopg import sql

from benchmarks.common import UPSTREAM_VERSION, machine, median, ms, table, upstream_python
from collector import repository
from collector.demo import sandbox
from collector.worker.remote import RemoteSession
from collector.worker.snapshot import Snapshot

UPSTREAM_DRIVER = """
import json, sys, time
import psycopg2
from powa_collector.powa_worker import PowaThread
repo_dsn, host, port, srvid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
counts = {"remote": 0, "repository": 0}
real_connect = psycopg2.connect
def counting_connect(*args, **kwargs):
    counts["remote" if kwargs.get("port") == port else "repository"] += 1
    return real_connect(*args, **kwargs)
psycopg2.connect = counting_connect
config = {"dsn": {"host": host, "port": port, "user": "postgres", "dbname": "powa"},
          "frequency": 300, "alias": "bench", "srvid": srvid}
worker = PowaThread("bench", {"dsn": repo_dsn}, config, False)
worker._PowaThread__check_powa()
for line in sys.stdin:
    counts.update(remote=0, repository=0)
    started, cpu = time.perf_counter(), time.process_time()
    worker._PowaThread__take_snapshot()
    print(json.dumps({"wall": time.perf_counter() - started,
                      "cpu": time.process_time() - cpu, **counts}), flush=True)
"""

Measure = dict[str, float]


class Upstream:
    """Upstream's worker code in its own process, one snapshot per request."""

    def __init__(self, repo: sandbox.Cluster, host: str, port: int, srvid: int) -> None:
        self.process = subprocess.Popen(
            [str(upstream_python()), "-c", UPSTREAM_DRIVER, repo.dsn(), host, str(port),
             str(srvid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def snapshot(self) -> Measure:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write("snap\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(60)


@contextmanager
def counting(port: int) -> Iterator[dict[str, int]]:
    """Count psycopg connections, to the remote (``port``) and to the repository."""
    counts = {"remote": 0, "repository": 0}
    real: Callable[..., Any] = psycopg.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        counts["remote" if kwargs.get("port") == port else "repository"] += 1
        return real(*args, **kwargs)

    with mock.patch.object(psycopg, "connect", connect):
        yield counts


class Ours:
    """powa-fleet's snapshot as a worker takes it: persistent remote session, short repo one."""

    def __init__(self, repo: sandbox.Cluster, port: int, srvid: int) -> None:
        self.repo, self.port, self.srvid = repo, port, srvid
        with repository.session(repo.dsn(), "bench") as conn:
            server = repository.read_server(conn, repository.require_powa(conn), srvid)
        self.session = RemoteSession(server)
        self.session.connect()

    def snapshot(self) -> Measure:
        with counting(self.port) as counts:
            started, cpu = time.perf_counter(), time.process_time()
            with repository.session(self.repo.dsn(), f"worker {self.srvid}") as conn:
                result = Snapshot(conn, self.session, self.srvid, budget=300).run()
            used = time.process_time() - cpu
        assert result.outcome == "ok", result.errors
        return {"wall": time.perf_counter() - started, "cpu": used, **counts}

    def close(self) -> None:
        self.session.close()


def make_remote(install: sandbox.PgInstall, template: Path, base: Path,
                databases: int) -> sandbox.Cluster:
    remote = sandbox.clone(template, base / f"remote{databases}", install=install)
    remote.aliases = ("127.0.0.2",)
    remote.configure({"max_connections": "300"})
    remote.start()
    sandbox.create_workload(remote, 300)
    with remote.connect("postgres") as conn:
        conn.execute("CREATE DATABASE bench_template")
    with remote.connect("bench_template") as conn:
        for i in range(5):
            conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(
                sql.Identifier(f"t{i}")))
            conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'v' FROM generate_series(1, 100) i")
                         .format(sql.Identifier(f"t{i}")))
    with remote.connect("postgres") as conn:
        for n in range(1, databases):
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE bench_template").format(
                sql.Identifier(f"db{n:03d}")))
        conn.execute("DROP DATABASE bench_template")
    return remote


def forget_catalogs(repo: sandbox.Cluster) -> None:
    """The next snapshot of each server reads every database's catalogs again."""
    with repo.connect() as conn:
        conn.execute("UPDATE powa_catalog_databases SET last_refresh = NULL")


def one_size(install: sandbox.PgInstall, template: Path, base: Path, databases: int,
             rounds: int, firsts: int) -> list[list[object]]:
    remote = make_remote(install, template, base, databases)
    repo = sandbox.clone(template, base / f"repo{databases}", install=install)
    repo.start()
    with repo.connect() as conn:
        mine = sandbox.register_remote(conn, remote, alias="powa-fleet")
        twin = sandbox.Cluster(remote.datadir, remote.port, "127.0.0.2", install=install)
        theirs = sandbox.register_remote(conn, twin, alias="upstream")
    ours, upstream = Ours(repo, remote.port, mine), Upstream(repo, "127.0.0.2", remote.port, theirs)
    measured: dict[str, list[Measure]] = {"ours": [], "upstream": []}
    try:
        for n in range(firsts + rounds):
            if 0 < n < firsts:
                forget_catalogs(repo)
            for who in (("ours", "upstream") if n % 2 else ("upstream", "ours")):
                measured[who].append(ours.snapshot() if who == "ours" else upstream.snapshot())
    finally:
        ours.close()
        upstream.close()
        repo.stop()
        remote.stop()
    with_dbs = f"{databases} (+ postgres, template1)"
    return [[with_dbs, which, name, *summary(measured[which][:firsts], measured[which][firsts:]),
             " ".join(f"{m['wall'] * 1000:.0f}" for m in measured[which])]
            for which, name in (("ours", "powa-fleet"),
                                ("upstream", f"upstream {UPSTREAM_VERSION}"))]


def summary(first: list[Measure], rest: list[Measure]) -> list[object]:
    """Medians: first wall, CPU, remote sessions; next wall, CPU, remote and repository ones."""
    def mid(measures: list[Measure], key: str) -> float:
        return median([m[key] for m in measures])

    return [ms(mid(first, "wall")), ms(mid(first, "cpu")), int(mid(first, "remote")),
            ms(mid(rest, "wall")), ms(mid(rest, "cpu")), int(mid(rest, "remote")),
            int(mid(rest, "repository"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--databases", default="1,20,100")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--firsts", type=int, default=3)
    args = parser.parse_args()
    install = sandbox.powa5()
    rows: list[list[object]] = []
    with sandbox.workspace("powa-fleet-bench5-", install) as base:
        template = sandbox.make_template(base, install)
        for databases in (int(d) for d in args.databases.split(",")):
            rows += one_size(install, template, base, databases, args.rounds,
                             max(1, args.firsts))
    print(f"## PoWA 5 snapshot, databases on the remote (issue 11)\n\n"
          f"{time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}; PostgreSQL 17 + PoWA 5.0.2,"
          f" upstream powa-collector {UPSTREAM_VERSION}\n")
    print(table(
        "One snapshot: wall and collector CPU (ms), sessions opened",
        ["user databases", "collector", "first: wall", "first: CPU", "first: remote sessions",
         "next: wall", "next: CPU", "next: remote sessions", "next: repository sessions"],
        [row[0:1] + row[2:-1] for row in rows],
    ))
    print(table("Every snapshot's wall time (ms), in order: the firsts, then the next ones",
                ["user databases", "collector", "wall"], [[r[0], r[2], r[-1]] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
