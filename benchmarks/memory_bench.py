"""Memory and start CPU of real workers under a real supervisord, setting by setting.

    .venv/bin/python -m benchmarks.memory_bench [--workers 50] [--variants ...]

One small fleet (remotes simulated by a PostgreSQL cluster on 50 loopback
addresses, as in fleet_bench), started once per variant of the worker's
program section, each adding one setting to the one before:

* baseline: redis-py imported whole (a ``sitecustomize`` on PYTHONPATH
  imports it before the worker), no environment, no flags;
* narrow redis: the worker as it imports redis-py (``collector.syncredis``);
* + MALLOC_ARENA_MAX=1;
* + -OO: the program section as the generator writes it (bytecode cache warmed);
* -OO, cold cache (``--variants`` to add it): the same, its cache removed first.

For each: the CPU a worker used (utime + stime) when its first status
appears in Redis, then Anonymous and PSS (``/proc/PID/smaps_rollup``) of
every worker at rest, then right after each took a forced snapshot.
Numbers are printed, not judged.
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import simplejson as json

from benchmarks.common import ROOT, ForkedWorkers, header, median, table
from benchmarks.fleet_bench import Fleet, make_remotes, register
from collector import config
from collector.cli.client import Client
from collector.demo import sandbox
from collector.fleet import bytecode, files
from collector.keys import SPAWNER, status_key
from collector.keys import client as redis_client

TICK = os.sysconf("SC_CLK_TCK")
#: a sitecustomize that imports redis-py whole, as the fleet did before collector.syncredis
FULL_REDIS = "import redis  # noqa: F401\n"


@dataclass
class Variant:
    name: str
    flags: tuple[str, ...]
    #: None: the environment the generator writes
    environment: dict[str, str] | None
    cold: bool = False
    #: workers forked by the fleet's spawner ([fleet] spawner)
    spawner: bool = False


@dataclass
class Measure:
    start_cpu_ms: list[float] = field(default_factory=list)
    rest: list[dict[str, int]] = field(default_factory=list)
    after: list[dict[str, int]] = field(default_factory=list)


def variants(base: Path) -> dict[str, Variant]:
    full = base / "full-redis"
    full.mkdir(exist_ok=True)
    (full / "sitecustomize.py").write_text(FULL_REDIS)
    return {v.name: v for v in [
        Variant("baseline", (), {"PYTHONPATH": str(full)}),
        Variant("narrow-redis", (), {}),
        Variant("arena", (), {"MALLOC_ARENA_MAX": "1"}),
        Variant("oo", files.WORKER_FLAGS, None),
        Variant("oo-cold", files.WORKER_FLAGS, None, cold=True),
        Variant("spawner", files.WORKER_FLAGS, None, spawner=True),
    ]}


LABELS = {
    "baseline": "baseline (redis-py whole)",
    "narrow-redis": "+ narrow redis import",
    "arena": "+ MALLOC_ARENA_MAX=1",
    "oo": "+ -OO, bytecode cache warm",
    "oo-cold": "+ -OO, bytecode cache cold",
    "spawner": "+ forked by the spawner (stand-in + worker)",
}


def rewrite_programs(directory: Path, variant: Variant) -> None:
    """The generated worker sections, with the flags and environment of ``variant``."""
    for path in (directory / "workers_available").glob("worker_*.conf"):
        lines = []
        for line in path.read_text().splitlines():
            if line.startswith("environment ="):
                continue
            if line.startswith("command ="):
                command = line
                for flag in files.WORKER_FLAGS:
                    command = command.replace(f" {flag} ", " ")
                python, rest = command.split(" -m ", 1)
                lines.append(" ".join([python, *variant.flags, "-m", rest]))
            else:
                lines.append(line)
        if variant.environment:
            lines.append("environment = " + ",".join(
                f'{k}="{v}"' for k, v in variant.environment.items()))
        elif variant.environment is None:
            cfg = config.load(directory / "collector.cfg")
            lines.append("environment = " + ",".join(
                f'{k}="{v}"' for k, v in files.worker_environment(cfg).items()))
        path.write_text("\n".join([*lines, ""]))


def memory(pids: list[int]) -> dict[str, int]:
    """PSS and Anonymous (KiB) of a worker: its processes summed."""
    total: dict[str, int] = {}
    for pid in pids:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        for key, value in re.findall(r"^(Pss|Anonymous):\s+(\d+)", text, re.MULTILINE):
            total[key] = total.get(key, 0) + int(value)
    return total


def cpu_ms(pids: list[int]) -> float:
    """CPU (ms) a worker's processes used; a forked worker's counts from its fork."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) * 1000 / TICK
    return total


def documents(url: str, prefix: str, srvids: list[int]) -> dict[int, dict[str, object]]:
    conn = redis_client(url)
    try:
        values = conn.mget([status_key(prefix, s) for s in srvids])
    finally:
        conn.close()
    found = {}
    for srvid, value in zip(srvids, values, strict=True):
        if value:
            found[srvid] = json.loads(value)
    return found


def first_statuses(url: str, prefix: str, srvids: list[int], timeout: float,
                   workers: ForkedWorkers) -> dict[int, float]:
    """Each worker's CPU (ms) when its status first appears."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(srvids) and time.monotonic() < deadline:
        for srvid, document in documents(url, prefix, [s for s in srvids
                                                       if s not in seen]).items():
            try:
                seen[srvid] = cpu_ms(workers.pids(
                    srvid, int(document["pid"])))  # type: ignore[call-overload]
            except (OSError, ValueError, KeyError):
                continue
        time.sleep(0.05)
    return seen


def measure(base: Path, repo: sandbox.Cluster, redis_url: str, srvids: list[int],
            variant: Variant, settle: float) -> Measure:
    fleet = Fleet(base / f"fleet-{variant.name}", repo, redis_url, spawner=variant.spawner)
    workers = ForkedWorkers(
        lambda: fleet.rpc.all_processes().get(SPAWNER, {}).get("pid") or None)
    fleet.generate()
    rewrite_programs(fleet.dir, variant)
    cfg = config.load(fleet.cfg)
    if variant.environment is None:
        shutil.rmtree(fleet.dir / files.BYTECODE_DIR, ignore_errors=True)
        if not variant.cold:
            bytecode.warm(cfg, sys.executable)
    result = Measure()
    fleet.start()
    try:
        started = first_statuses(redis_url, cfg.redis.prefix, srvids, timeout=300,
                                 workers=workers)
        result.start_cpu_ms = list(started.values())
        fleet.wait_running(len(srvids))
        time.sleep(settle)
        pids = {s: workers.pids(s, int(d["pid"]))  # type: ignore[call-overload]
                for s, d in documents(redis_url, cfg.redis.prefix, srvids).items()}
        result.rest = [memory(both) for both in pids.values()]
        with Client(repo.dsn()) as client:
            for srvid in srvids:
                client.ask("FORCE_SNAPSHOT", (str(srvid),), timeout=10)
        deadline = time.monotonic() + 300
        pending = set(srvids)
        while pending and time.monotonic() < deadline:
            for srvid, document in documents(redis_url, cfg.redis.prefix,
                                             sorted(pending)).items():
                if document.get("snapshots_ok") and not document.get("snapshot_in_progress"):
                    result.after.append(memory(pids[srvid]))
                    pending.discard(srvid)
            time.sleep(0.05)
    finally:
        fleet.stop()
    return result


def kib(values: list[int]) -> str:
    return f"{median(values) / 1024:.1f} / {max(values) / 1024:.1f}"


def row(label: str, measured: Measure) -> list[object]:
    cpu = measured.start_cpu_ms
    return [
        label, len(measured.rest),
        f"{median(cpu):.0f} / {max(cpu):.0f}" if cpu else "-",
        kib([m["Anonymous"] for m in measured.rest]),
        kib([m["Pss"] for m in measured.rest]),
        kib([m["Anonymous"] for m in measured.after]) if measured.after else "-",
        kib([m["Pss"] for m in measured.after]) if measured.after else "-",
    ]


def bench(args: argparse.Namespace, base: Path) -> str:
    # as make bytecode does: the baseline variants read the package's .pyc too
    compileall.compile_dir(str(ROOT / "collector"), quiet=1)
    template = sandbox.make_template(base)
    hosts = make_remotes(template, base, args.workers)
    redis_server = sandbox.RedisServer()
    redis_server.start()
    repo = sandbox.clone(template, base / "repo")
    repo.configure({"max_connections": str(args.workers + 50)})
    repo.start()
    # a long period: at rest means no scheduled snapshot; forced ones are measured after
    register(repo, hosts, frequency=3600)
    srvids = list(range(1, args.workers + 1))
    chosen = variants(base)
    rows = []
    try:
        for name in args.variants.split(","):
            measured = measure(base, repo, redis_server.url, srvids, chosen[name], args.settle)
            rows.append(row(LABELS[name], measured))
            print(f"{LABELS[name]}: {rows[-1][2:]}", file=sys.stderr, flush=True)
    finally:
        repo.stop()
        redis_server.stop()
    return table(
        f"Worker memory (MiB, median / max of {args.workers}) and start CPU (ms)",
        ["worker program", "workers", "CPU to first status", "Anonymous at rest",
         "PSS at rest", "Anonymous after a snapshot", "PSS after a snapshot"],
        rows,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--variants", default="baseline,narrow-redis,arena,oo,spawner",
                        help="comma-separated, among: " + ", ".join(LABELS))
    parser.add_argument("--settle", type=float, default=10,
                        help="seconds between the last start and the at-rest reading")
    args = parser.parse_args()
    with sandbox.workspace("powa-fleet-membench-") as base:
        body = bench(args, base)
        for cluster_dir in base.glob("remotes*"):
            sandbox.Cluster(cluster_dir, 0).stop("immediate")
    print(header("Worker memory, setting by setting (issue 14)"))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
