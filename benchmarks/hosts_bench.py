"""Several collector hosts sharing one fleet (issue 15): takeover, joins, coordination cost.

    .venv/bin/python -m benchmarks.hosts_bench [--servers 60] [--trials 10] [--period 20]

Three hosts (fleet directories with their own supervisord, ``[fleet] host``
alpha, beta, gamma, heartbeat 1 s) share one repository and one Redis; the
servers are simulated as in fleet_bench (clusters on many loopback
addresses).  A trigger logs every snapshot stored.  Measured:

* takeover after a host is lost (supervisord and everything under it
  SIGKILLed), over ``--trials`` trials, one host after another: seconds
  until the survivors run programs for all its servers, until those workers
  report ``running``, until each has stored a snapshot; and the longest gap
  between two snapshots of a lost server, in periods (the promise: <= 2);
* a fourth host joining: servers moved, and whether anything moved other
  than to the newcomer;
* the steady cost of the coordination per host: the control's CPU per
  minute, Redis commands per host per minute, and the lease check a
  snapshot makes (two queries in its transaction);
* over the whole run: pairs of snapshots of a server closer than half the
  period (the promise: none).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import simplejson as json

from benchmarks.common import ROOT, header, median, table
from benchmarks.fleet_bench import make_remotes, register
from collector import hosts, mailbox
from collector.demo import sandbox
from collector.fleet.supervisord import Supervisor
from collector.keys import client
from collector.repository import require_powa
from collector.syncredis import redis
from collector.worker.lease import LeaseCheck

NAMES = ("alpha", "beta", "gamma")
LOG = """
CREATE TABLE snapshot_log (srvid int, snapts timestamptz,
                           logged timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION log_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.coalesce_seq IS DISTINCT FROM OLD.coalesce_seq THEN
    INSERT INTO snapshot_log (srvid, snapts) VALUES (NEW.srvid, NEW.snapts);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER log_snapshot AFTER UPDATE ON powa_snapshot_metas
  FOR EACH ROW EXECUTE FUNCTION log_snapshot();
"""


class Host:
    """One collector host: a fleet directory and its supervisord."""

    def __init__(self, base: Path, name: str, repo: sandbox.Cluster, redis_url: str,
                 key_from: Path | None) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir()
        self.cfg = self.dir / "collector.cfg"
        self.cfg.write_text(
            f"[repository]\ndsn = {repo.dsn()}\n[redis]\nurl = {redis_url}\nprefix = hosts\n"
            f"[supervisor]\nhttp =\n[collector]\nlog_level = info\n"
            f"[fleet]\nhost = {name}\nheartbeat = 1\n")
        self.cfg.chmod(0o600)
        if key_from is not None:
            shutil.copy2(key_from / mailbox.KEY_FILE, self.dir / mailbox.KEY_FILE)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        subprocess.run([sys.executable, str(ROOT / "create_supervisord_config.py"), "-c",
                        str(self.cfg)], check=True, capture_output=True, cwd=ROOT)
        (self.dir / "supervisor.sock").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "supervisord"), "-n", "-c",
             str(self.dir / "supervisord.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, umask=0o077)
        wait((self.dir / "supervisor.sock").exists, 60, f"{self.name} supervisord")

    def programs(self) -> set[int]:
        return {int(p.name[len("worker_"):-len(".conf")])
                for p in (self.dir / "workers_available").glob("worker_*.conf")}

    def control_pid(self) -> int:
        info = Supervisor(self.dir / "supervisor.sock").process("control")
        return int(info["pid"]) if info else 0

    def kill(self) -> None:
        """supervisord and every process under it, SIGKILL: a machine gone at once."""
        assert self.process is not None
        sandbox.kill_tree(self.process.pid)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            sandbox.terminate(self.process, 120)
            self.process = None


def wait(predicate: Callable[[], object], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - started


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.template = sandbox.make_template(base)
        self.addresses = make_remotes(self.template, base, args.servers)
        self.repo = sandbox.clone(self.template, base / "repository")
        self.repo.configure({"max_connections": str(args.servers + 100)})
        self.repo.start()
        register(self.repo, self.addresses, frequency=args.period)
        with self.repo.connect() as conn:
            conn.execute(LOG)
            self.srvids = [int(r[0]) for r in conn.execute(
                "SELECT id FROM powa_servers WHERE id > 0 ORDER BY id")]
        self.redis = sandbox.RedisServer()
        self.redis.start()
        self.hosts: dict[str, Host] = {}
        #: (share applied, running, snapshotted, longest gap in periods) of each trial
        self.timings: list[tuple[float, float, float, float]] = []

    def add_host(self, name: str) -> Host:
        first = next(iter(self.hosts.values()), None)
        if first is not None:
            mailbox.fleet_key(first.dir)
        host = Host(self.base, name, self.repo, self.redis.url, first.dir if first else None)
        self.hosts[name] = host
        host.start()
        return host

    def live(self) -> list[str]:
        return sorted(name for name, host in self.hosts.items() if host.process is not None)

    def shares_applied(self) -> bool:
        live = self.live()
        return all(self.hosts[name].programs() == set(hosts.owned(self.srvids, live, name))
                   for name in live)

    def statuses(self) -> dict[int, dict[str, object]]:
        prefix = "hosts"
        with contextlib.closing(client(self.redis.url)) as connection:
            raw = connection.mget([f"{prefix}:worker:{s}" for s in self.srvids])
        return {s: json.loads(text) for s, text in zip(self.srvids, raw, strict=True) if text}

    def running_on(self, srvids: set[int], exclude: str) -> bool:
        documents = self.statuses()
        return all(documents.get(s, {}).get("status") == "running"
                   and documents[s].get("host") != exclude for s in srvids)

    def last_snapshots(self) -> dict[int, list[float]]:
        found: dict[int, list[float]] = {}
        with self.repo.connect() as conn:
            for srvid, at in conn.execute("SELECT srvid, extract(epoch FROM snapts)::float8"
                                          " FROM snapshot_log ORDER BY srvid, snapts"):
                found.setdefault(int(srvid), []).append(float(at))
        return found

    def settle(self) -> None:
        wait(self.shares_applied, 120, "shares applied")
        wait(lambda: self.running_on(set(self.srvids), exclude=""), 120, "all running")

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop()
        self.redis.stop()
        self.repo.stop("immediate")


def takeover(bench: Bench, trials: int, period: int) -> list[list[object]]:
    rows: list[list[object]] = []
    timings: list[tuple[float, float, float, float]] = []
    for trial in range(trials):
        name = NAMES[trial % len(NAMES)]
        measured = _lose(bench, bench.hosts[name], period)
        timings.append(measured)
        rows.append([trial + 1, name, len(bench.hosts[name].programs()),
                     *(f"{value:.1f}" for value in measured[:3]), f"{measured[3]:.2f}"])
        print(*rows[-1], flush=True)
        bench.hosts[name].start()
        bench.settle()
    bench.timings = timings
    return rows


def _lose(bench: Bench, host: Host, period: int) -> tuple[float, float, float, float]:
    """Kill ``host``; (share applied, running, snapshotted) seconds, and the longest gap."""
    lost = host.programs()
    before = bench.last_snapshots()
    host.kill()
    killed_wall, killed = time.time(), time.monotonic()
    share = wait(bench.shares_applied, 120, "survivors' share")
    running = wait(lambda: bench.running_on(lost, exclude=host.name), 120, "lost ones running")

    def stored() -> bool:
        after = bench.last_snapshots()
        return all(after.get(s) and after[s][-1] > killed_wall for s in lost)

    wait(stored, 4 * period, "lost ones snapshotted")
    snapshot = time.monotonic() - killed
    after = bench.last_snapshots()
    gaps = [next(t for t in after[s] if t > killed_wall) - max(before.get(s, [0.0]))
            for s in lost if before.get(s)]
    for s in sorted(lost):
        print(f"  server {s}: last before {max(before.get(s, [0.0])) - killed_wall:+.1f}s,"
              f" first after {next(t for t in after[s] if t > killed_wall) - killed_wall:+.1f}s",
              flush=True)
    return share, running, snapshot, max(gaps, default=0) / period


def joining(bench: Bench) -> list[list[object]]:
    before = {name: bench.hosts[name].programs() for name in NAMES}
    bench.add_host("delta")
    elapsed = wait(bench.shares_applied, 120, "delta's share")
    after = {name: bench.hosts[name].programs() for name in (*NAMES, "delta")}
    moved = set().union(*(before[n] - after[n] for n in NAMES))
    elsewhere = set().union(*(after[n] - before[n] for n in NAMES))
    return [[len(bench.srvids), len(moved), f"{len(moved) / len(bench.srvids):.0%}",
             "yes" if moved == after["delta"] and not elsewhere else "NO",
             f"{elapsed:.1f}"]]


def overhead(bench: Bench, seconds: float) -> list[list[object]]:
    connection = client(bench.redis.url)
    pids = {name: bench.hosts[name].control_pid() for name in NAMES}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    calls = _redis_calls(connection)
    time.sleep(seconds)
    calls = _redis_calls(connection) - calls
    connection.close()
    rows: list[list[object]] = [
        [f"control CPU of host {name}", f"{(cpu_seconds(pid) - cpu[name]) * 60 / seconds:.2f}"
         " s/min"] for name, pid in pids.items()]
    rows.append(["Redis commands, all clients, per host", f"{calls * 60 / seconds / 3:.0f} /min"])
    with bench.repo.connect(autocommit=False) as conn:
        check = LeaseCheck("alpha", bench.srvids[0], bench.args.period, forced=False)
        powa = require_powa(conn)
        timings = []
        for _ in range(300):
            started = time.perf_counter()
            with contextlib.suppress(Exception):
                check(conn, powa)
            timings.append(time.perf_counter() - started)
            conn.rollback()
    rows.append(["lease check of one snapshot (median of 300)",
                 f"{median(timings) * 1000:.2f} ms"])
    return rows


def _redis_calls(connection: redis.Redis) -> int:
    info = connection.info("commandstats")
    return sum(int(v["calls"]) for v in info.values())


def spacing(bench: Bench, period: int) -> list[list[object]]:
    found = bench.last_snapshots()
    close = sum(1 for times in found.values()
                for a, b in itertools.pairwise(times) if b - a < period / 2)
    total = sum(len(t) for t in found.values())
    return [[total, close]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=60)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--period", type=int, default=20)
    parser.add_argument("--overhead", type=float, default=60, help="seconds of steady state")
    parser.add_argument("--logs", type=Path, help="copy every host's logs/ here at the end")
    args = parser.parse_args()
    with sandbox.workspace("powa-fleet-hosts-bench-") as base:
        bench = Bench(args, base)
        try:
            for name in NAMES:
                bench.add_host(name)
            bench.settle()
            steady = overhead(bench, args.overhead)
            trials = takeover(bench, args.trials, args.period)
            join = joining(bench)
            close = spacing(bench, args.period)
        finally:
            bench.close()
            if args.logs:
                for name, host in bench.hosts.items():
                    shutil.copytree(host.dir / "logs", args.logs / name, dirs_exist_ok=True)
    print(header("hosts_bench"))
    print(table(f"Takeover after a host is lost ({args.servers} servers, 3 hosts, period"
                f" {args.period}s, heartbeat 1s; seconds after SIGKILL)",
                ["trial", "host", "servers", "survivors run them", "workers running",
                 "all snapshotted", "longest gap (periods)"], trials))
    shares, runs, snaps, gaps = (list(column) for column in zip(*bench.timings, strict=True))
    print(table("Takeover, over the trials", ["measure", "median", "max"], [
        ["survivors run the lost servers' programs (s)", f"{median(shares):.1f}",
         f"{max(shares):.1f}"],
        ["their workers report running (s)", f"{median(runs):.1f}", f"{max(runs):.1f}"],
        ["every lost server snapshotted again (s)", f"{median(snaps):.1f}", f"{max(snaps):.1f}"],
        ["longest gap between two snapshots (periods)", f"{median(gaps):.2f}",
         f"{max(gaps):.2f}"]]))
    print(table("A fourth host joins", ["servers", "moved", "share moved", "only to the newcomer",
                                        "applied after (s)"], join))
    print(table("Steady cost of the coordination (3 hosts)", ["what", "cost"], steady))
    print(table("Whole run", ["snapshots stored", "pairs closer than half a period"], close))
    return 0


if __name__ == "__main__":
    sys.exit(main())
