"""One snapshot of a big server: wall time against the server-side work, and against upstream.

    .venv/bin/python benchmarks/snapshot_bench.py [--rounds N] [--statements N]

A remote with ~3,500 pg_stat_statements entries plus pg_stat_kcache and
pg_qualstats.  Each round refreshes the workload, then measures:

* server-side work, with no client in the way: every source query run by the
  remote into a file (COPY ... TO '<file>'), those files loaded by the
  repository into the _tmp tables (COPY ... FROM '<file>'), then
  powa_take_snapshot(N), all rolled back;
* powa-fleet: one snapshot as the worker takes it (repository connection,
  streaming COPY out -> COPY in, powa_take_snapshot, commit);
* upstream powa-collector 1.3.2: one snapshot by its own worker thread code.

Then the worker's memory (PSS) at rest and at the peak of snapshots, for
remotes of growing size, beside upstream's process doing the same snapshots.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import simplejson as json
from psycopg import sql

from benchmarks.common import ROOT, header, median, ms, pss_kib, table, upstream_python
from collector import repository
from collector.demo import sandbox
from collector.worker.remote import RemoteSession
from collector.worker.snapshot import Snapshot

UPSTREAM_DRIVER = """
import json, logging, sys, time
from powa_collector.powa_worker import PowaThread
repo_dsn, host, port, srvid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = {"dsn": {"host": host, "port": port, "user": "postgres", "dbname": "powa"},
          "frequency": 300, "alias": "bench", "srvid": srvid}
worker = PowaThread("bench", {"dsn": repo_dsn}, config, False)
worker._PowaThread__check_powa()
for line in sys.stdin:
    started = time.perf_counter()
    worker._PowaThread__take_snapshot()
    print(json.dumps({"wall": time.perf_counter() - started}), flush=True)
"""


class Upstream:
    """Upstream's worker code in its own process, one snapshot per request."""

    def __init__(self, repo: sandbox.Cluster, remote: sandbox.Cluster, srvid: int) -> None:
        self.process = subprocess.Popen(
            [str(upstream_python()), "-c", UPSTREAM_DRIVER, repo.dsn(), remote.host,
             str(remote.port), str(srvid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def snapshot(self) -> float:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write("snap\n")
        self.process.stdin.flush()
        return float(json.loads(self.process.stdout.readline())["wall"])

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(30)


def sources(repo: sandbox.Cluster, srvid: int) -> list[tuple[str, str | None]]:
    with repo.connect() as conn:
        rows = conn.execute(
            "SELECT query_source, query_cleanup FROM powa_functions WHERE srvid = %s"
            " AND operation = 'snapshot' AND enabled ORDER BY priority, module", (srvid,)
        ).fetchall()
    return [(str(s), c) for s, c in rows]


def server_side(repo: sandbox.Cluster, remote: sandbox.Cluster, srvid: int,
                spool: Path) -> dict[str, float]:
    """Seconds of each server-side step of one snapshot, measured without any client work."""
    found = sources(repo, srvid)
    timings = {"sources": 0.0, "copy": 0.0, "take": 0.0}
    with remote.connect() as conn, conn.transaction():
        for source, cleanup in found:
            started = time.perf_counter()
            conn.execute(sql.SQL("COPY (SELECT {}, * FROM {}(0)) TO {}").format(
                sql.Literal(srvid), sql.Identifier("public", source),
                sql.Literal(str(spool / f"{source}.copy"))))
            if cleanup:
                conn.execute(cleanup)
            timings["sources"] += time.perf_counter() - started
    with repo.connect() as conn, conn.transaction(force_rollback=True):
        for source, _ in found:
            started = time.perf_counter()
            conn.execute(sql.SQL("COPY {} FROM {}").format(
                sql.Identifier("public", source + "_tmp"),
                sql.Literal(str(spool / f"{source}.copy"))))
            timings["copy"] += time.perf_counter() - started
        started = time.perf_counter()
        conn.execute("SELECT powa_take_snapshot(%s)", (srvid,))
        timings["take"] += time.perf_counter() - started
    timings["sum"] = timings["sources"] + timings["copy"] + timings["take"]
    return timings


def ours(
    repo: sandbox.Cluster, remote: RemoteSession, srvid: int
) -> tuple[float, dict[str, float]]:
    """One snapshot as the worker takes it: wall time and its phases."""
    started = time.perf_counter()
    with repository.session(repo.dsn(), f"worker {srvid}") as conn:
        result = Snapshot(conn, remote, srvid, budget=300).run()
    wall = time.perf_counter() - started
    assert result.outcome == "ok", result.errors
    return wall, result.timings


def timing_rounds(args: argparse.Namespace, base: Path, template: Path) -> str:
    repo = sandbox.clone(template, base / "repo")
    remote = sandbox.clone(template, base / "remote")
    repo.start()
    remote.start()
    spool = base / "spool"
    spool.mkdir()
    sandbox.give_to_postgres(spool)
    with repo.connect() as conn:
        srvid = sandbox.register_remote(conn, remote, alias="bench")
    sandbox.create_workload(remote, args.statements)
    with remote.connect() as conn:
        entries = conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()[0]  # type: ignore[index]
    with repository.session(repo.dsn(), "bench") as conn:
        server = repository.read_server(conn, repository.require_powa(conn), srvid)
    session = RemoteSession(server)
    session.connect()
    upstream = Upstream(repo, remote, srvid)
    # two of each first: connections, caches and the first history rows
    for _ in range(2):
        ours(repo, session, srvid)
        upstream.snapshot()
    rows: list[list[object]] = []
    sums, walls, theirs_all = [], [], []
    for n in range(1, args.rounds + 1):
        sandbox.create_workload(remote, args.statements)
        side = server_side(repo, remote, srvid, spool)
        # each snapshot adds history that makes the next powa_take_snapshot a bit slower:
        # take turns going first
        measured = {}
        for who in (("ours", "upstream") if n % 2 else ("upstream", "ours")):
            sandbox.create_workload(remote, args.statements)
            measured[who] = ours(repo, session, srvid)[0] if who == "ours" else upstream.snapshot()
        wall, theirs = measured["ours"], measured["upstream"]
        sums.append(side["sum"])
        walls.append(wall)
        theirs_all.append(theirs)
        rows.append([n, ms(side["sources"]), ms(side["copy"]), ms(side["take"]), ms(side["sum"]),
                     ms(wall), f"{wall / side['sum']:.2f}", ms(theirs), f"{theirs / wall:.2f}"])
    upstream.close()
    session.close()
    rows.append(["median", "", "", "", ms(median(sums)), ms(median(walls)),
                 f"{median([w / s for w, s in zip(walls, sums, strict=True)]):.2f}",
                 ms(median(theirs_all)),
                 f"{median([t / w for t, w in zip(theirs_all, walls, strict=True)]):.2f}"])
    repo.stop()
    remote.stop()
    return table(
        f"One snapshot, {entries} pg_stat_statements entries (+ kcache, qualstats), ms",
        ["round", "remote sources", "repository COPY", "powa_take_snapshot",
         "server-side sum", "powa-fleet wall", "wall / sum", "upstream wall",
         "upstream / powa-fleet (same round)"],
        rows,
    )


class Sampler(threading.Thread):
    """PSS of a process every few milliseconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.samples.append(pss_kib(self.pid))
            except (OSError, ValueError):
                return
            time.sleep(0.002)

    def stop(self) -> list[int]:
        self.running = False
        self.join()
        return self.samples


def memory(base: Path, template: Path, sizes: list[int]) -> str:
    repo = sandbox.clone(template, base / "memrepo")
    repo.start()
    redis_server = sandbox.RedisServer()
    redis_server.start()
    cfg = base / "collector.cfg"
    cfg.write_text(f"[repository]\ndsn = {repo.dsn()}\n[redis]\nurl = {redis_server.url}\n"
                   "[collector]\nlog_level = warning\n")
    rows = []
    for size in sizes:
        remote = sandbox.clone(template, base / f"mem{size}")
        remote.start()
        with repo.connect() as conn:
            srvid = sandbox.register_remote(conn, remote, alias=f"mem{size}", frequency=5)
        sandbox.create_workload(remote, size)
        with remote.connect() as conn:
            entries = conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()[0]  # type: ignore[index]
        worker = subprocess.Popen(
            [sys.executable, "-m", "collector.worker", "-c", str(cfg), "--srvid", str(srvid)],
            cwd=ROOT,
        )
        time.sleep(2)
        rest = pss_kib(worker.pid)
        sampler = Sampler(worker.pid)
        sampler.start()
        # two snapshots at the 5 s frequency, with a fresh workload before each
        for _ in range(3):
            sandbox.create_workload(remote, size)
            time.sleep(4)
        samples = sampler.stop()
        with repo.connect() as conn:
            snapshots = conn.execute(
                "SELECT coalesce_seq - 1 FROM powa_snapshot_metas WHERE srvid = %s", (srvid,)
            ).fetchone()[0]  # type: ignore[index]
        worker.terminate()
        worker.wait(30)
        upstream = Upstream(repo, remote, srvid)
        sampler = Sampler(upstream.process.pid)
        time.sleep(0.5)
        sampler.start()
        for _ in range(2):
            sandbox.create_workload(remote, size)
            upstream.snapshot()
        upstream_peak = max(sampler.stop())
        upstream.close()
        rows.append([entries, snapshots, f"{rest / 1024:.1f}", f"{max(samples) / 1024:.1f}",
                     f"{upstream_peak / 1024:.1f}"])
        remote.stop()
    redis_server.stop()
    repo.stop()
    return table(
        "Worker memory (PSS, MiB): at rest and at the peak of snapshots",
        ["statements", "snapshots sampled", "powa-fleet at rest", "powa-fleet peak",
         "upstream peak (one server)"],
        rows,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--statements", type=int, default=3500)
    parser.add_argument("--memory-sizes", default="200,3500,9000")
    args = parser.parse_args()
    output = [header("Snapshot of one server (issue 2)")]
    with sandbox.workspace("powa-fleet-bench-") as base:
        template = sandbox.make_template(base)
        output.append(timing_rounds(args, base, template))
        output.append(memory(base, template, [int(s) for s in args.memory_sizes.split(",")]))
    print("\n".join(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
