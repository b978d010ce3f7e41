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

Then CPU (issue 14), measured from outside each process:

* a scheduled worker (the program section the generator writes: its flags,
  its environment, its bytecode cache) beside upstream's daemon collecting an
  identical server, both every ``--cpu-frequency`` seconds: CPU of all
  threads (``/proc/PID/task/*/schedstat``) over ``--cpu-seconds`` divided by
  the snapshots taken meanwhile, and each thread's CPU and wake-ups; at
  that frequency the worker keeps its repository session between snapshots
  (``[repository] keep_session_below``), so a second one is measured with a
  session per snapshot, as for servers collected every minute or less often;
* ``python -m collector.worker --once`` against upstream's code taking one
  snapshot in a fresh process (upstream has no one-shot command): wall time
  from exec to exit, turn by turn on the same server.
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import simplejson as json
from psycopg import sql

from benchmarks.common import ROOT, header, median, ms, pss_kib, table, upstream_python
from collector import config, repository, spawning
from collector.demo import sandbox
from collector.fleet import bytecode, files
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


UPSTREAM_ONCE = """
import sys
from powa_collector.powa_worker import PowaThread
repo_dsn, host, port, srvid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = {"dsn": {"host": host, "port": port, "user": "postgres", "dbname": "powa"},
          "frequency": 300, "alias": "bench", "srvid": srvid}
worker = PowaThread("bench", {"dsn": repo_dsn}, config, False)
worker._PowaThread__check_powa()
worker._PowaThread__take_snapshot()
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


def cpu_ns(pid: int) -> dict[int, tuple[int, int]]:
    """(ns on CPU, times scheduled) of each thread of ``pid``, by thread id."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu, _, slices = task.joinpath("schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        found[int(task.name)] = (int(on_cpu), int(slices))
    return found


def snapshot_count(repo: sandbox.Cluster) -> int:
    with repo.connect() as conn:
        row = conn.execute("SELECT sum(coalesce_seq) FROM powa_snapshot_metas"
                           " WHERE srvid > 0").fetchone()
    return int(row[0] or 0) if row else 0


def fleet_cfg(base: Path, repo: sandbox.Cluster, redis_url: str, name: str,
              keep_session_below: int = 60) -> Path:
    directory = base / name
    directory.mkdir()
    path = directory / "collector.cfg"
    path.write_text(f"[repository]\ndsn = {repo.dsn()}\n"
                    f"keep_session_below = {keep_session_below}\n"
                    f"[redis]\nurl = {redis_url}\nprefix = {name}\n"
                    "[collector]\nlog_level = warning\n")
    return path


def worker_environment(cfg_path: Path) -> dict[str, str]:
    """The environment the generated program sections give the worker and the spawner."""
    cfg = config.load(cfg_path)
    bytecode.warm(cfg, sys.executable)
    return {**os.environ, **files.worker_environment(cfg)}


def spawner(cfg_path: Path) -> subprocess.Popen[bytes]:
    """The fleet's spawner as the generated [program:spawner] runs it; once it listens."""
    process = subprocess.Popen(
        [sys.executable, *files.WORKER_FLAGS, "-m", "collector.worker.spawner", "-c",
         str(cfg_path)], cwd=ROOT, env=worker_environment(cfg_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = cfg_path.parent / spawning.SOCKET_NAME
    deadline = time.monotonic() + 60
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the spawner did not start")
        time.sleep(0.05)
    return process


def scheduled_worker(cfg_path: Path, srvid: int, forked: bool) -> subprocess.Popen[bytes]:
    """A worker started as supervisord would start it from the generated section.

    With a spawner listening in the fleet directory, this process is the
    worker's stand-in and the worker is the spawner's child.
    """
    environment = {**worker_environment(cfg_path), "SUPERVISOR_ENABLED": "1"}
    if not forked:
        environment.pop(spawning.ENV_SPAWNER, None)
    return subprocess.Popen(
        [sys.executable, *files.WORKER_FLAGS, "-m", "collector.worker", "-c", str(cfg_path),
         "--srvid", str(srvid)], cwd=ROOT, env=environment,
    )


def worker_tasks(process: subprocess.Popen[bytes], spawner_pid: int | None) -> list[int]:
    """The pids whose CPU is the worker's: its process, and its forked worker if any."""
    pids = [process.pid]
    if spawner_pid is not None:
        children = Path(f"/proc/{spawner_pid}/task/{spawner_pid}/children").read_text().split()
        pids += [int(child) for child in children]
    return pids


def upstream_daemon(base: Path, repo: sandbox.Cluster) -> subprocess.Popen[bytes]:
    python = upstream_python()
    workdir = base / "upstream-daemon"
    workdir.mkdir()
    (workdir / "powa-collector.conf").write_text(json.dumps(
        {"repository": {"dsn": repo.dsn()}, "use_server_alias": False, "debug": False}))
    return subprocess.Popen([str(python), str(Path(python).parent / "powa-collector.py")],
                            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_rounds(args: argparse.Namespace, base: Path, template: Path) -> str:
    """CPU per snapshot of scheduled workers (forked, alone) and upstream's daemon, same run."""
    redis_server = sandbox.RedisServer()
    redis_server.start()
    who_all = ("forked", "fresh", "alone", "theirs")
    clusters = {}
    for who in who_all:
        for part in ("repo", "remote"):
            clusters[f"cpu-{who}-{part}"] = sandbox.clone(template, base / f"cpu-{who}-{part}")
            clusters[f"cpu-{who}-{part}"].start()
        sandbox.create_workload(clusters[f"cpu-{who}-remote"], args.cpu_statements)
    srvids = {}
    for who in who_all:
        with clusters[f"cpu-{who}-repo"].connect() as conn:
            srvids[who] = sandbox.register_remote(conn, clusters[f"cpu-{who}-remote"],
                                                  frequency=args.cpu_frequency)
    forked_cfg = fleet_cfg(base, clusters["cpu-forked-repo"], redis_server.url, "cpu-forked")
    # a session per snapshot, as for servers collected every minute or less often
    fresh_cfg = fleet_cfg(base, clusters["cpu-fresh-repo"], redis_server.url, "cpu-fresh",
                          keep_session_below=0)
    the_spawner = spawner(forked_cfg)
    fresh_spawner = spawner(fresh_cfg)
    processes = {
        "powa-fleet worker, forked by the spawner": (
            scheduled_worker(forked_cfg, srvids["forked"], forked=True),
            clusters["cpu-forked-repo"], the_spawner.pid),
        "... the same, a repository session per snapshot": (
            scheduled_worker(fresh_cfg, srvids["fresh"], forked=True),
            clusters["cpu-fresh-repo"], fresh_spawner.pid),
        "powa-fleet worker, alone": (
            scheduled_worker(fleet_cfg(base, clusters["cpu-alone-repo"], redis_server.url,
                                       "cpu-alone"), srvids["alone"], forked=False),
            clusters["cpu-alone-repo"], None),
        "upstream powa-collector": (upstream_daemon(base, clusters["cpu-theirs-repo"]),
                                    clusters["cpu-theirs-repo"], None),
    }
    rows: list[list[object]] = []
    threads: list[list[object]] = []

    def tasks_of(process: subprocess.Popen[bytes], spawner_pid: int | None,
                 ) -> dict[int, tuple[int, int]]:
        found: dict[int, tuple[int, int]] = {}
        for pid in worker_tasks(process, spawner_pid):
            found.update(cpu_ns(pid))
        return found

    try:
        # past the start, the first connections and the first snapshots
        time.sleep(3 * args.cpu_frequency + 5)
        before = {who: (tasks_of(p, sp), snapshot_count(r))
                  for who, (p, r, sp) in processes.items()}
        time.sleep(args.cpu_seconds)
        for who, (process, repo, spawner_pid) in processes.items():
            tasks, count = tasks_of(process, spawner_pid), snapshot_count(repo)
            start, start_count = before[who]
            spent = {tid: (tasks[tid][0] - start.get(tid, (0, 0))[0],
                           tasks[tid][1] - start.get(tid, (0, 0))[1]) for tid in tasks}
            total = sum(ns for ns, _ in spent.values())
            snapshots = count - start_count
            rows.append([who, len(tasks), snapshots, ms(total / 1e9),
                         ms(total / 1e9 / snapshots) if snapshots else "-"])
            pids = worker_tasks(process, spawner_pid)
            for n, tid in enumerate(sorted(spent)):
                ns, slices = spent[tid]
                label = ("stand-in" if tid == process.pid and spawner_pid else
                         "main" if tid in pids else f"thread {n}")
                threads.append([who, label, ms(ns / 1e9), slices,
                                f"{slices / args.cpu_seconds:.2f}"])
    finally:
        for process, _, _ in processes.values():
            sandbox.terminate(process, 30)
        sandbox.terminate(the_spawner, 30)
        sandbox.terminate(fresh_spawner, 30)
        for cluster in clusters.values():
            cluster.stop()
        redis_server.stop()
    return "\n".join([
        table(f"CPU per snapshot, every {args.cpu_frequency} s for {args.cpu_seconds:.0f} s,"
              f" {args.cpu_statements} statements (all threads, /proc schedstat)",
              ["process", "threads", "snapshots", "CPU ms", "CPU ms per snapshot"], rows),
        table("The same, thread by thread", ["process", "thread", "CPU ms", "times scheduled",
                                             "per second"], threads),
    ])


def once_rounds(args: argparse.Namespace, base: Path, template: Path) -> str:
    """``--once`` against upstream's code taking one snapshot, fresh processes, in turns."""
    # as make bytecode does: with PYTHONDONTWRITEBYTECODE set, a module edited since
    # would be compiled at every run, and measured as if it were the worker's cost
    compileall.compile_dir(str(ROOT / "collector"), quiet=1)
    redis_server = sandbox.RedisServer()
    redis_server.start()
    repo = sandbox.clone(template, base / "once-repo")
    remote = sandbox.clone(template, base / "once-remote")
    repo.start()
    remote.start()
    sandbox.create_workload(remote, args.cpu_statements)
    with repo.connect() as conn:
        srvid = sandbox.register_remote(conn, remote, alias="once")
    cfg = fleet_cfg(base, repo, redis_server.url, "once-fleet")
    forked_cfg = fleet_cfg(base, repo, redis_server.url, "once-forked")
    the_spawner = spawner(forked_cfg)
    commands = {
        "ours": [sys.executable, "-m", "collector.worker", "-c", str(cfg), "--srvid",
                 str(srvid), "--once"],
        "forked": [sys.executable, "-m", "collector.worker", "-c", str(forked_cfg), "--srvid",
                   str(srvid), "--once"],
        "upstream": [str(upstream_python()), "-c", UPSTREAM_ONCE, repo.dsn(), remote.host,
                     str(remote.port), str(srvid)],
    }
    walls: dict[str, list[float]] = {who: [] for who in commands}
    try:
        for n in range(args.once_rounds + 1):
            for who in (("ours", "forked", "upstream") if n % 2 else
                        ("upstream", "forked", "ours")):
                started = time.perf_counter()
                subprocess.run(commands[who], cwd=ROOT, check=True, capture_output=True)
                if n:
                    # the first round warms the caches of both
                    walls[who].append(time.perf_counter() - started)
    finally:
        sandbox.terminate(the_spawner, 30)
        repo.stop()
        remote.stop()
        redis_server.stop()
    rows = []
    for who, label in (("ours", "powa-fleet --once, no spawner"),
                       ("forked", "powa-fleet --once, the fleet's spawner listening")):
        ratios = [o / u for o, u in zip(walls[who], walls["upstream"], strict=True)]
        rows.append([label, ms(median(walls[who])), ms(median(walls["upstream"])),
                     f"{median(ratios):.2f}"])
    return table(
        f"One-shot snapshot in a fresh process, {args.cpu_statements} statements, wall ms"
        f" (median of {args.once_rounds})",
        ["command", "powa-fleet", "upstream, one snapshot", "ours / upstream (median of rounds)"],
        rows,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--statements", type=int, default=3500)
    parser.add_argument("--memory-sizes", default="200,3500,9000")
    parser.add_argument("--cpu-statements", type=int, default=500)
    parser.add_argument("--cpu-frequency", type=int, default=5)
    parser.add_argument("--cpu-seconds", type=float, default=50)
    parser.add_argument("--once-rounds", type=int, default=10)
    parser.add_argument("--only", choices=("timing", "memory", "cpu"),
                        help="run one part only")
    args = parser.parse_args()
    output = [header("Snapshot of one server (issue 2)")]
    with sandbox.workspace("powa-fleet-bench-") as base:
        template = sandbox.make_template(base)
        if args.only in (None, "timing"):
            output.append(timing_rounds(args, base, template))
        if args.only in (None, "memory"):
            output.append(memory(base, template, [int(s) for s in args.memory_sizes.split(",")]))
        if args.only in (None, "cpu"):
            output.append(cpu_rounds(args, base, template))
            output.append(once_rounds(args, base, template))
    print("\n".join(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
