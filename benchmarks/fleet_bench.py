"""A fleet of hundreds of real workers: generator, --apply, WORKERS_STATUS, RELOAD, memory.

    .venv/bin/python -m benchmarks.fleet_bench [--servers 500]

Remote servers are simulated by a few PostgreSQL clusters, each listening on
50 loopback addresses (127.0.K.1 ... 127.0.K.50), so every powa_servers row
is a distinct host:port and every worker holds its own remote connection.
Every worker is a real process under a real supervisord.

Measured (issues 3 and 4):
* create_supervisord_config.py for the whole fleet, first run and a run with
  no change;
* WORKERS_STATUS round trip as a powa-web client sees it, p50/p99, with 3,
  100 and ``--servers`` workers, and upstream powa-collector 1.3.2 with 3;
* RELOAD adding one server to a 100-worker fleet (answer time);
* WORKERS_STATUS while a RELOAD adds ``--servers`` - 103 servers and their
  workers start, and while a role without rights floods the control with
  20,000 requests (issues 10 and 12: the control must keep answering);
* --apply of one added server to the running full fleet;
* memory: PSS of each worker in the full fleet, and of supervisord.
"""

from __future__ import annotations

import argparse
import json as stdjson
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from benchmarks.common import (
    ROOT,
    ForkedWorkers,
    header,
    median,
    ms,
    percentile,
    pss_kib,
    table,
    upstream_python,
)
from collector.cli.client import Answer, Client
from collector.demo import sandbox
from collector.fleet.supervisord import Supervisor
from collector.keys import SPAWNER

PER_CLUSTER = 50
REQUESTS = 300
APPLIES = 5
#: requests of the unprivileged flood
FLOOD = 20_000


def make_remotes(template: Path, base: Path, count: int) -> list[tuple[str, int]]:
    """(host, port) of ``count`` simulated remote servers, 50 per cluster."""
    hosts = []
    for k in range((count + PER_CLUSTER - 1) // PER_CLUSTER):
        aliases = tuple(f"127.0.{k + 1}.{i}" for i in range(1, PER_CLUSTER + 1))
        cluster = sandbox.clone(template, base / f"remotes{k}")
        cluster = sandbox.Cluster(cluster.datadir, cluster.port, aliases[0], aliases[1:])
        cluster.configure({"max_connections": str(PER_CLUSTER + 30)})
        cluster.start()
        sandbox.create_workload(cluster, 100)
        hosts += [(alias, cluster.port) for alias in aliases]
    return hosts[:count]


def register(repo: sandbox.Cluster, hosts: list[tuple[str, int]], frequency: int = 300) -> None:
    with repo.connect() as conn:
        for host, port in hosts:
            conn.execute(
                "SELECT powa_register_server(hostname => %s, port => %s, username => 'postgres',"
                " dbname => 'powa', frequency => %s,"
                " extensions => '{pg_stat_kcache,pg_qualstats}')",
                (host, port, frequency),
            )


def run(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                            check=False, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return time.perf_counter() - started, result


class Fleet:
    def __init__(self, directory: Path, repo: sandbox.Cluster, redis_url: str,
                 spawner: bool = True) -> None:
        directory.mkdir()
        self.dir = directory
        self.repo = repo
        self.cfg = directory / "collector.cfg"
        self.cfg.write_text(
            f"[repository]\ndsn = {repo.dsn()}\n[redis]\nurl = {redis_url}\n"
            f"prefix = {directory.name}\n[supervisor]\nhttp =\n[collector]\nlog_level = warning\n"
            f"[fleet]\nspawner = {str(spawner).lower()}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def generate(self, *args: str) -> tuple[float, str]:
        elapsed, result = run(str(ROOT / "create_supervisord_config.py"), "-c", str(self.cfg),
                              *args)
        return elapsed, result.stdout

    @property
    def rpc(self) -> Supervisor:
        return Supervisor(self.dir / "supervisor.sock", timeout=120)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "supervisord"), "-n", "-c",
             str(self.dir / "supervisord.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (self.dir / "supervisor.sock").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("supervisord did not start")
            time.sleep(0.1)

    def wait_running(self, count: int, timeout: float = 900) -> float:
        """Seconds until ``count`` workers answer ``running`` to WORKERS_STATUS."""
        started = time.monotonic()
        with Client(self.repo.dsn()) as client:
            while time.monotonic() - started < timeout:
                states = self.rpc.all_processes()
                running = sum(1 for i in states.values() if i["statename"] == "RUNNING")
                if running >= count + 1:
                    answers = client.ask("WORKERS_STATUS", (), timeout=5)
                    if answers and answers[0].status == "OK":
                        data = stdjson.loads(answers[0].data)
                        if sum(1 for v in data.values() if v == "running") + int(
                            data.get("omitted", 0)
                        ) >= count and all(v == "running" for k, v in data.items()
                                           if k != "omitted"):
                            return time.monotonic() - started
                time.sleep(2)
        raise TimeoutError(f"{count} workers not running after {timeout}s")

    def worker_pss(self) -> list[int]:
        """PSS of each worker: supervisord's process, plus the worker the spawner forked."""
        processes = self.rpc.all_processes()
        workers = ForkedWorkers(lambda: processes.get(SPAWNER, {}).get("pid") or None)
        sizes = []
        for name, info in processes.items():
            if name.startswith("worker_") and info["pid"]:
                pids = workers.pids(int(name.removeprefix("worker_")), int(info["pid"]))
                try:
                    sizes.append(sum(pss_kib(pid) for pid in pids))
                except (OSError, ValueError):
                    continue
        return sizes

    def stop(self) -> None:
        if self.process is not None:
            sandbox.terminate(self.process, 300)


def round_trips(dsn: str, srvid: str | None = None, count: int = REQUESTS) -> list[float]:
    args = (srvid,) if srvid else ()
    times = []
    with Client(dsn) as client:
        for _ in range(count):
            answers = client.ask("WORKERS_STATUS", args, timeout=5)
            if answers and answers[0].status == "OK":
                times.append(answers[0].elapsed)
    return times


def probing(dsn: str, action: Callable[[], object]) -> tuple[list[float], int]:
    """WORKERS_STATUS round trips asked over and over while ``action`` runs.

    Returns the round trips of answered requests, and the count of requests
    that got no answer within powa-web's 1 s.
    """
    times: list[float] = []
    missed = [0]
    done = threading.Event()

    def probe() -> None:
        with Client(dsn) as client:
            while not done.is_set():
                answers = client.ask("WORKERS_STATUS", (), timeout=1)
                if answers and answers[0].status == "OK":
                    times.append(answers[0].elapsed)
                else:
                    missed[0] += 1
                time.sleep(0.05)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        action()
    finally:
        done.set()
        thread.join()
    return times, missed[0]


def flood(repo: sandbox.Cluster, requests: int) -> None:
    """``requests`` WORKERS_STATUS from a role without rights, one transaction each."""
    with psycopg.connect(repo.dsn(), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS flooder")
        conn.execute("CREATE ROLE flooder LOGIN")
    with psycopg.connect(repo.dsn(user="flooder"), autocommit=True) as conn:
        for _ in range(requests):
            conn.execute("NOTIFY powa_collector, 'WORKERS_STATUS flood'")


def latency_row(what: str, servers: int, times: list[float]) -> list[object]:
    return [what, servers, len(times), ms(percentile(times, 50)), ms(percentile(times, 99)),
            ms(max(times))]


def compare(ours_dsn: str, servers: int, upstream_dsn: str) -> list[list[object]]:
    """powa-fleet and upstream (3 servers) taking turns, so both see the same machine load."""
    ours: list[float] = []
    theirs: list[float] = []
    # a p99 of a few hundred samples is the third worst: take enough to mean something
    for _ in range(10):
        ours += round_trips(ours_dsn, count=REQUESTS)
        theirs += round_trips(upstream_dsn, count=REQUESTS)
    load = Path("/proc/loadavg").read_text().split()[0]
    return [
        latency_row(f"powa-fleet (load average {load})", servers, ours),
        latency_row("upstream powa-collector 1.3.2, same moments", 3, theirs),
    ]


@contextmanager
def upstream_collector(base: Path, repo: sandbox.Cluster) -> Iterator[None]:
    python = upstream_python()
    workdir = base / "upstream"
    workdir.mkdir()
    (workdir / "powa-collector.conf").write_text(stdjson.dumps(
        {"repository": {"dsn": repo.dsn()}, "use_server_alias": False, "debug": False}))
    script = Path(python).parent / "powa-collector.py"
    process = subprocess.Popen([str(python), str(script)], cwd=workdir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        with Client(repo.dsn()) as client:
            while not client.ask("WORKERS_STATUS", (), timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError("upstream powa-collector does not answer")
        yield
    finally:
        sandbox.terminate(process, 60)


def bench(args: argparse.Namespace, base: Path) -> str:
    template = sandbox.make_template(base)
    total = args.servers
    hosts = make_remotes(template, base, total + APPLIES + 6)
    redis_server = sandbox.RedisServer()
    redis_server.start()
    latency: list[list[object]] = []
    timings: list[list[object]] = []
    memory: list[list[object]] = []
    # upstream runs on a repository of its own with three servers, all along
    theirs = sandbox.clone(template, base / "upstream-repo")
    theirs.start()
    register(theirs, hosts[-3:])
    try:
        with upstream_collector(base, theirs):
            body = fleet_bench(args, base, template, hosts, redis_server, theirs,
                               latency, timings, memory)
    finally:
        redis_server.stop()
        theirs.stop()
    return body


def fleet_bench(
    args: argparse.Namespace, base: Path, template: Path, hosts: list[tuple[str, int]],
    redis_server: sandbox.RedisServer, theirs: sandbox.Cluster,
    latency: list[list[object]], timings: list[list[object]], memory: list[list[object]],
) -> str:
    total = args.servers
    time.sleep(2)
    latency.append(latency_row("upstream powa-collector 1.3.2, idle machine", 3,
                               round_trips(theirs.dsn())))
    small = sandbox.clone(template, base / "repo3")
    small.start()
    register(small, hosts[:3])
    three = Fleet(base / "fleet3", small, redis_server.url)
    three.generate()
    three.start()
    three.wait_running(3)
    latency.append(latency_row("powa-fleet, idle machine", 3, round_trips(small.dsn())))
    latency.append(latency_row("powa-fleet, one server", 3, round_trips(small.dsn(), "2")))
    three.stop()
    small.stop()

    repo = sandbox.clone(template, base / "repo")
    repo.configure({"max_connections": "300"})
    repo.start()
    fleet = Fleet(base / "fleet", repo, redis_server.url)
    register(repo, hosts[:100])
    fleet.generate()
    fleet.start()
    fleet.wait_running(100)
    latency += compare(repo.dsn(), 100, theirs.dsn())
    latency.append(latency_row("powa-fleet, one server", 100, round_trips(repo.dsn(), "50")))
    for n in range(3):
        register(repo, hosts[100 + n: 101 + n])
        with Client(repo.dsn()) as client:
            answer = client.ask("RELOAD", (), timeout=60)[0]
        assert answer.status == "OK", answer
        timings.append([f"RELOAD adding one server to {100 + n} workers (answer)",
                        ms(answer.elapsed)])

    register(repo, hosts[103:total])
    answers: list[Answer] = []

    def reload_and_start() -> None:
        with Client(repo.dsn()) as client:
            answers.extend(client.ask("RELOAD", (), timeout=600))
        fleet.wait_running(total)

    started = time.monotonic()
    during, missed = probing(repo.dsn(), reload_and_start)
    ready = time.monotonic() - started
    timings.append([f"RELOAD adding {total - 103} servers to 103 workers (answer)",
                    ms(answers[0].elapsed)])
    latency.append(latency_row(f"powa-fleet during that RELOAD and the start of its"
                               f" workers ({missed} unanswered within 1 s)", total, during))
    timings.append([f"... until all {total} workers answer running", ms(ready)])
    # measure the steady state (snapshots spread over the period), not the start-up rush
    time.sleep(args.settle)
    latency += compare(repo.dsn(), total, theirs.dsn())
    latency.append(latency_row("powa-fleet, one server", total,
                               round_trips(repo.dsn(), "250")))
    during, missed = probing(repo.dsn(), lambda: flood(repo, FLOOD))
    latency.append(latency_row(f"powa-fleet during {FLOOD:,} requests of a role without"
                               f" rights ({missed} unanswered within 1 s)", total, during))

    applies = []
    for n in range(APPLIES):
        register(repo, hosts[total + n: total + n + 1])
        elapsed, out = fleet.generate("--apply")
        assert "started" in out, out
        applies.append(elapsed)
    timings.append([f"create_supervisord_config.py --apply, one server added to {total}"
                    f"..{total + APPLIES - 1} running programs (median of {APPLIES})",
                    ms(median(applies))])
    timings.append(["... slowest of them", ms(max(applies))])

    sizes = fleet.worker_pss()
    assert fleet.process is not None
    memory.append(["worker (median of all)", len(sizes), f"{median(sizes) / 1024:.1f}"])
    memory.append(["worker (largest)", len(sizes), f"{max(sizes) / 1024:.1f}"])
    memory.append(["all workers together", len(sizes), f"{sum(sizes) / 1024:.0f}"])
    memory.append(["supervisord", 1, f"{pss_kib(fleet.process.pid) / 1024:.1f}"])
    fleet.stop()

    # the generator alone, on a fresh directory, for the whole fleet
    fresh = Fleet(base / "fresh", repo, redis_server.url)
    first, _ = fresh.generate()
    again, out = fresh.generate()
    assert out.strip() == "nothing changed", out
    with psycopg.connect(repo.dsn()) as conn:
        rows = conn.execute("SELECT count(*) FROM powa_servers WHERE id > 0").fetchone()
    timings.insert(0, [f"create_supervisord_config.py, {rows[0] if rows else '?'} servers,"
                       " first run", ms(first)])
    timings.insert(1, ["create_supervisord_config.py, same servers, no change", ms(again)])
    repo.stop()
    return "\n".join([
        table("WORKERS_STATUS round trip seen by a powa-web-like client (ms)",
              ["collector", "servers", "requests", "p50", "p99", "max"], latency),
        table("Generator, apply and reload (ms)", ["operation", "ms"], timings),
        table("Memory in the full fleet (PSS, MiB)", ["process", "count", "MiB"], memory),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=500)
    parser.add_argument("--settle", type=float, default=120,
                        help="seconds to let the full fleet settle before measuring it")
    args = parser.parse_args()
    with sandbox.workspace("powa-fleet-bench-") as base:
        body = bench(args, base)
        for cluster_dir in base.glob("remotes*"):
            sandbox.Cluster(cluster_dir, 0).stop("immediate")
    print(header("Fleet of workers (issues 3 and 4)"))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
