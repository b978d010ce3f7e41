"""A host's worth of workers (issue 14): start, memory, schedule lag and a big RELOAD.

    .venv/bin/python -m benchmarks.scale_bench [--servers 800] [--observe 330] [--keep]
    .venv/bin/python -m benchmarks.scale_bench --quick      # 100 servers, 60 s: a check

The fleet is built as in fleet_bench (whose functions it uses): a few
PostgreSQL clusters each listening on 50 loopback addresses stand for many
hosts, every worker is a real process under a real supervisord, with a real
redis-server.  All ``--servers`` are registered at frequency 300 before
supervisord starts, then:

1. start: supervisord's start until every ``worker_N`` is RUNNING and has a
   status document in Redis whose pid is supervisord's (the start gate of
   collector.worker.startgate paces this), WORKERS_STATUS asked all along;
2. memory: PSS and anonymous PSS (``Pss_Anon``) of every worker at rest, then
   right after a forced snapshot (FORCE_SNAPSHOT in waves of 50), and after
   the scheduled snapshots seen in 3.; the host's other processes; how many
   workers fit in 20 GiB;
   (a worker is supervisord's process, the stand-in, plus the worker the
   spawner forked for it; the spawner is counted once, with the others);
3. schedule lag: for each scheduled snapshot seen during ``--observe``
   seconds, its start minus its due time, the due time being the
   ``next_snapshot_due`` the worker announced in its status document before
   the snapshot (observed before 2.'s forced snapshots, which restart each
   worker's cadence in waves);
4. RELOAD: half the servers (at most 400) deleted and the RELOAD done, then
   as many registered again: the time to ``RELOAD OK`` and until every new
   worker runs with a status, WORKERS_STATUS asked all along.

CPU per snapshot against upstream is benchmarks/snapshot_bench.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import ForkedWorkers, header, median, ms, percentile, table
from benchmarks.fleet_bench import Fleet, latency_row, make_remotes, register, round_trips
from collector import config
from collector.cli.client import Client
from collector.demo import sandbox
from collector.fleet import bytecode, files
from collector.keys import (
    CONTROL,
    LISTENER,
    SPAWNER,
    STATUS_RUNNING,
    loads,
    program_name,
    status_key,
)
from collector.keys import client as redis_client
from collector.syncredis import redis

FREQUENCY = 300
#: the memory a 24 GiB host gives its workers
BUDGET_MIB = 20 * 1024
#: FORCE_SNAPSHOT requests sent together
WAVE = 50
#: the most servers the RELOAD of part 4 removes, then adds
CHANGE = 400
POLL = 0.5


@dataclass
class Probe:
    """WORKERS_STATUS asked over and over in a thread, as powa-web's page would.

    Requests before the control's first answer (it is starting) are not
    counted; after it, one not answered within powa-web's 1 s is ``missed``.
    """

    dsn: str
    times: list[float] = field(default_factory=list)
    #: (seconds since the probe began, round trip or None when not answered within 1 s)
    samples: list[tuple[float, float | None]] = field(default_factory=list)
    missed: int = 0
    first_answer: float | None = None
    _started: float = 0.0
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with Client(self.dsn) as client:
            while not self._done.is_set():
                asked = time.monotonic() - self._started
                answers = client.ask("WORKERS_STATUS", (), timeout=1)
                if answers and answers[0].status == "OK":
                    if self.first_answer is None:
                        self.first_answer = time.monotonic() - self._started
                    self.times.append(answers[0].elapsed)
                    self.samples.append((asked, answers[0].elapsed))
                elif self.first_answer is not None:
                    self.missed += 1
                    self.samples.append((asked, None))
                time.sleep(0.05)

    def timeline(self, step: float = 10.0) -> list[list[object]]:
        """Requests, unanswered, p50/p99/max (ms) in each ``step`` seconds since the start."""
        buckets: dict[int, list[float | None]] = {}
        for at, elapsed in self.samples:
            buckets.setdefault(int(at // step), []).append(elapsed)
        rows: list[list[object]] = []
        for bucket, values in sorted(buckets.items()):
            times = [v for v in values if v is not None]
            rows.append([f"{bucket * step:.0f}-{(bucket + 1) * step:.0f}", len(values),
                         len(values) - len(times),
                         *([ms(percentile(times, 50)), ms(percentile(times, 99)), ms(max(times))]
                           if times else ["-", "-", "-"])])
        return rows

    def row(self, what: str, servers: int) -> list[object]:
        if not self.times:
            return [f"{what} (no answer)", servers, 0, "-", "-", "-"]
        return latency_row(f"{what} ({self.missed} unanswered within 1 s)", servers, self.times)


def smaps(pid: int) -> tuple[int, int]:
    """PSS and anonymous PSS (KiB) of a process."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    found = dict(re.findall(r"^(Pss|Pss_Anon):\s+(\d+)", text, re.MULTILINE))
    return int(found["Pss"]), int(found["Pss_Anon"])


def epoch(text: object) -> float | None:
    return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None


class Host:
    """The fleet under test and what surrounds it: repository, Redis, supervisord."""

    def __init__(self, fleet: Fleet, redis_server: sandbox.RedisServer) -> None:
        self.fleet = fleet
        self.redis_server = redis_server
        self.prefix = config.load(fleet.cfg).redis.prefix
        self.redis = redis_client(redis_server.url, socket_timeout=10)
        self.workers = ForkedWorkers(lambda: self.pids().get(SPAWNER))
        #: srvid -> (PSS, anonymous PSS) of the program's process alone, its last reading
        self.stand_ins: dict[int, tuple[int, int]] = {}

    def worker_smaps(self, srvid: int, pid: int) -> tuple[int, int]:
        """PSS and anonymous PSS of a worker: supervisord's process, and its forked worker.

        With the spawner, supervisord's process is the worker's stand-in
        (collector.worker.stub) and the worker is the spawner's child; both count.
        """
        pids = self.workers.pids(srvid, pid)
        stand_in = smaps(pid)
        if len(pids) == 1:
            return stand_in
        self.stand_ins[srvid] = stand_in
        worker = smaps(pids[1])
        return stand_in[0] + worker[0], stand_in[1] + worker[1]

    def documents(self, srvids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Status documents; none when Redis does not answer in time (a sample missed)."""
        try:
            values = (self.redis.mget([status_key(self.prefix, s) for s in srvids])
                      if srvids else [])
        except redis.RedisError as exc:
            print(f"note: Redis did not answer a status read: {exc}", file=sys.stderr)
            return {}
        found = {}
        for srvid, value in zip(srvids, values, strict=True):
            document = loads(value)
            if document is not None:
                found[srvid] = document
        return found

    def pids(self) -> dict[str, int]:
        return {name: int(info["pid"]) for name, info in self.fleet.rpc.all_processes().items()
                if info["statename"] == "RUNNING" and info["pid"]}

    def wait_started(self, srvids: Sequence[int], since: float,
                     timeout: float = 1200) -> dict[str, float]:
        """Seconds from ``since`` until every worker is RUNNING, has its status, is running."""
        reached: dict[str, float] = {}
        while len(reached) < 3:
            elapsed = time.monotonic() - since
            if elapsed > timeout:
                raise TimeoutError(f"workers not all started after {timeout}s: {reached}")
            pids = self.pids()
            documents = self.documents(srvids)
            running = [s for s in srvids if program_name(s) in pids]
            ours = [s for s in running if documents.get(s, {}).get("pid") == pids[program_name(s)]]
            checks = {
                "RUNNING in supervisord": len(running) == len(srvids),
                "status in Redis from that pid": len(ours) == len(srvids),
                f"status {STATUS_RUNNING!r}": len(ours) == len(srvids) and all(
                    documents[s].get("status") == STATUS_RUNNING for s in srvids),
            }
            for what, done in checks.items():
                if done and what not in reached:
                    reached[what] = elapsed
            time.sleep(POLL)
        return reached

    def others(self) -> dict[str, int]:
        """supervisord, its programs that are not workers, and redis-server (pids)."""
        pids = self.pids()
        assert self.fleet.process is not None and self.redis_server.process is not None
        found = {"supervisord": self.fleet.process.pid,
                 "redis-server": self.redis_server.process.pid}
        for name in (CONTROL, LISTENER, SPAWNER):
            if name in pids:
                found[name] = pids[name]
        return found


@dataclass
class Memory:
    #: (PSS, anonymous PSS) in KiB, by srvid
    rest: dict[int, tuple[int, int]] = field(default_factory=dict)
    forced: dict[int, tuple[int, int]] = field(default_factory=dict)
    scheduled: dict[int, tuple[int, int]] = field(default_factory=dict)
    others: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: at rest, supervisord's process alone (the stand-in of a forked worker)
    stand_ins: dict[int, tuple[int, int]] = field(default_factory=dict)


def at_rest(host: Host, srvids: Sequence[int]) -> Memory:
    memory = Memory()
    for srvid, document in host.documents(srvids).items():
        if not document.get("snapshot_in_progress"):
            try:
                memory.rest[srvid] = host.worker_smaps(srvid, int(document["pid"]))
            except (OSError, KeyError, ValueError):
                continue
    memory.stand_ins = dict(host.stand_ins)
    for name, pid in host.others().items():
        memory.others[name] = smaps(pid)
    return memory


def snapshot_ended(document: dict[str, Any], since: float) -> bool:
    started = epoch(document.get("last_snapshot_start"))
    return (started is not None and started >= since and not document.get("snapshot_in_progress")
            and document.get("last_snapshot_duration") is not None)


def force_wave(host: Host, dsn: str, wave: Sequence[int],
               memory: Memory) -> tuple[list[str], list[int]]:
    """FORCE_SNAPSHOT of ``wave``, memory right after each snapshot.

    Returns the refusals, and the workers that refused because their last
    snapshot is less than 10 s old (upstream's rule), to be asked again.
    """
    refused, recent = [], []
    since = time.time() - 0.01
    with Client(dsn) as client:
        for srvid in wave:
            answers = client.ask("FORCE_SNAPSHOT", (str(srvid),), timeout=5)
            if answers and answers[0].status == "OK":
                continue
            if answers and "less than" in answers[0].data:
                recent.append(srvid)
            else:
                refused.append(f"{srvid}: {answers[0].data if answers else 'no answer'}")
    pending = {s for s in wave if not any(r.startswith(f"{s}:") for r in refused)} - set(recent)
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for srvid, document in host.documents(sorted(pending)).items():
            if snapshot_ended(document, since):
                pending.discard(srvid)
                with contextlib.suppress(OSError, ValueError):
                    memory.forced[srvid] = host.worker_smaps(srvid, int(document["pid"]))
        time.sleep(0.05)
    return refused + [f"{s}: no snapshot within 120 s" for s in sorted(pending)], recent


def force_all(host: Host, dsn: str, srvids: Sequence[int], memory: Memory) -> list[str]:
    """FORCE_SNAPSHOT of every worker, a wave at a time; the refusals."""
    refused: list[str] = []
    recent: list[int] = []
    for first in range(0, len(srvids), WAVE):
        more, later = force_wave(host, dsn, srvids[first:first + WAVE], memory)
        refused += more
        recent += later
    if recent:
        time.sleep(10)
        more, later = force_wave(host, dsn, recent, memory)
        refused += more + [f"{s}: snapshot less than 10 s old, twice" for s in later]
    return refused


def observe(host: Host, srvids: Sequence[int], seconds: float,
            memory: Memory) -> list[float]:
    """Schedule lags (s) of the snapshots started during ``seconds``; memory after each."""
    #: the next_snapshot_due and last_snapshot_start of each worker's last document seen
    announced: dict[int, float | None] = {}
    last_start: dict[int, float | None] = {}
    #: the snapshot (its start) whose memory was read last, by srvid
    measured: dict[int, float | None] = {}
    lags = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for srvid, document in host.documents(srvids).items():
            started = epoch(document.get("last_snapshot_start"))
            if srvid not in last_start:
                measured[srvid] = started
            elif started is not None and started != last_start[srvid]:
                due = announced.get(srvid)
                if due is not None:
                    lags.append(started - due)
            if (started is not None and started != measured[srvid]
                    and snapshot_ended(document, started)):
                measured[srvid] = started
                with contextlib.suppress(OSError, ValueError, KeyError):
                    memory.scheduled[srvid] = host.worker_smaps(srvid, int(document["pid"]))
            last_start[srvid] = started
            announced[srvid] = epoch(document.get("next_snapshot_due"))
        time.sleep(1)
    return lags


def srvids_of(repo: sandbox.Cluster) -> list[int]:
    with repo.connect() as conn:
        return [int(r[0]) for r in
                conn.execute("SELECT id FROM powa_servers WHERE id > 0 ORDER BY id").fetchall()]


def remove(host: Host, repo: sandbox.Cluster, removed: Sequence[int]) -> float:
    """Delete servers, RELOAD; seconds until their programs are gone from supervisord."""
    with repo.connect() as conn:
        for srvid in removed:
            conn.execute("SELECT powa_delete_and_purge_server(%s)", (srvid,))
    started = time.monotonic()
    with Client(repo.dsn()) as client:
        answers = client.ask("RELOAD", (), timeout=60)
    assert answers and answers[0].status == "OK", answers
    names = {program_name(s) for s in removed}
    while time.monotonic() - started < 600:
        if not names & set(host.pids()):
            return time.monotonic() - started
        time.sleep(POLL)
    raise TimeoutError("removed workers still running after 600 s")


@dataclass
class Report:
    servers: int
    latency: list[list[object]] = field(default_factory=list)
    start: list[list[object]] = field(default_factory=list)
    #: WORKERS_STATUS during the start, ten seconds at a time
    start_timeline: list[list[object]] = field(default_factory=list)
    reload: list[list[object]] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    lags: list[float] = field(default_factory=list)
    observed: float = 0.0
    notes: list[str] = field(default_factory=list)


def build(args: argparse.Namespace, base: Path, stack: contextlib.ExitStack,
          ) -> tuple[Host, sandbox.Cluster, list[tuple[str, int]]]:
    """Clusters, Redis, the fleet's files; each stopped by ``stack`` (the fleet too, later)."""
    stack.callback(stop_clusters, base)
    template = sandbox.make_template(base)
    hosts = make_remotes(template, base, args.servers)
    redis_server = sandbox.RedisServer()
    redis_server.start()
    stack.callback(redis_server.stop)
    repo = sandbox.clone(template, base / "repo")
    # every worker's short sessions (its row, its snapshots) and the control's, with room
    repo.configure({"max_connections": str(args.servers + 100)})
    repo.start()
    register(repo, hosts, FREQUENCY)
    fleet = Fleet(base / "fleet", repo, redis_server.url)
    stack.callback(fleet.stop)
    fleet.generate()
    if not (fleet.dir / files.BYTECODE_DIR).exists():
        # what the generator is meant to do once (collector.fleet.bytecode)
        bytecode.warm(config.load(fleet.cfg), sys.executable)
    host = Host(fleet, redis_server)
    stack.callback(host.redis.close)
    return host, repo, hosts


def stop_clusters(base: Path) -> None:
    for datadir in [base / "repo", *base.glob("remotes*")]:
        if (datadir / "postmaster.pid").exists():
            sandbox.Cluster(datadir, 0).stop("immediate")


def start(host: Host, repo: sandbox.Cluster, srvids: list[int], report: Report) -> None:
    since = time.monotonic()
    host.fleet.start()
    with Probe(repo.dsn()) as probe:
        reached = host.wait_started(srvids, since)
    if probe.first_answer is not None:
        report.start.append(["control's first answer to WORKERS_STATUS",
                             f"{probe.first_answer:.1f}"])
    report.start += [[f"all {len(srvids)} workers {what}", f"{seconds:.1f}"]
                     for what, seconds in reached.items()]
    report.latency.append(probe.row("during the start", len(srvids)))
    report.start_timeline = probe.timeline()


def big_reload(host: Host, repo: sandbox.Cluster, hosts: list[tuple[str, int]],
               report: Report) -> None:
    srvids = srvids_of(repo)
    change = min(CHANGE, len(srvids) // 2)
    removed = srvids[-change:]
    gone = remove(host, repo, removed)
    report.reload.append([f"{change} servers deleted: RELOAD until their workers are gone",
                          f"{gone:.1f}"])
    register(repo, hosts[len(srvids) - change:len(srvids)], FREQUENCY)
    added = [s for s in srvids_of(repo) if s > srvids[-1]]
    since = time.monotonic()
    with Probe(repo.dsn()) as probe, Client(repo.dsn()) as client:
        answers = client.ask("RELOAD", (), timeout=60)
        reached = host.wait_started(added, since)
    answer = f"{answers[0].status} after {ms(answers[0].elapsed)} ms" if answers else "none"
    report.reload.append([f"{len(added)} servers added: RELOAD answer (target < 1 s)", answer])
    report.reload += [[f"... until all {len(added)} new workers {what} (target < 120 s)",
                       f"{seconds:.1f}"] for what, seconds in reached.items()]
    report.latency.append(probe.row(f"during the RELOAD adding {len(added)}", len(srvids)))


def bench(args: argparse.Namespace, base: Path, stack: contextlib.ExitStack,
          report: Report) -> None:
    host, repo, hosts = build(args, base, stack)
    srvids = srvids_of(repo)
    start(host, repo, srvids, report)
    time.sleep(args.settle)
    report.memory = at_rest(host, srvids)
    report.latency.append(latency_row("at rest", len(srvids), round_trips(repo.dsn())))
    began = time.monotonic()
    report.lags = observe(host, srvids, args.observe, report.memory)
    report.observed = time.monotonic() - began
    refused = force_all(host, repo.dsn(), srvids, report.memory)
    report.notes += [f"FORCE_SNAPSHOT {r}" for r in refused[:10]]
    big_reload(host, repo, hosts, report)


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def memory_rows(memory: Memory) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, sizes in (("worker at rest (stand-in + forked worker)", memory.rest),
                         ("... of which the stand-in", memory.stand_ins),
                         ("worker right after a forced snapshot", memory.forced),
                         ("worker right after a scheduled snapshot", memory.scheduled)):
        if sizes:
            pss = [p for p, _ in sizes.values()]
            anon = [a for _, a in sizes.values()]
            rows.append([label, len(sizes), mib(median(pss)), mib(max(pss)),
                         mib(median(anon)), mib(max(anon))])
    for name, (one_pss, one_anon) in memory.others.items():
        rows.append([name, 1, mib(one_pss), "", mib(one_anon), ""])
    if memory.rest:
        total = sum(p for p, _ in memory.rest.values()) + sum(
            p for p, _ in memory.others.values())
        rows.append(["total at rest: workers + the above", len(memory.rest) + len(memory.others),
                     f"{total / 1024:.0f}", "", "", ""])
    return rows


def capacity_rows(memory: Memory) -> list[list[object]]:
    rows: list[list[object]] = []
    for label, sizes in (("at rest", memory.rest), ("after a forced snapshot", memory.forced)):
        if sizes:
            anon = [a / 1024 for _, a in sizes.values()]
            rows.append([label, f"{BUDGET_MIB / median(anon):.0f}",
                         f"{BUDGET_MIB / max(anon):.0f}"])
    return rows


def lag_rows(report: Report) -> list[list[object]]:
    lags = report.lags
    if not lags:
        return [[f"{report.observed:.0f}", 0, "-", "-", "-", "-"]]
    return [[f"{report.observed:.0f}", len(lags), ms(percentile(lags, 50)),
             ms(percentile(lags, 99)), ms(max(lags)), ms(min(lags))]]


def render(report: Report) -> str:
    lines = [
        table(f"1. Start of {report.servers} workers at frequency {FREQUENCY} (s from"
              " supervisord's start)", ["reached", "s"], report.start),
        table("WORKERS_STATUS round trip seen by a powa-web-like client (ms; target p99 < 100)",
              ["when", "servers", "requests", "p50", "p99", "max"], report.latency),
        table("WORKERS_STATUS during the start, 10 s at a time (s since supervisord's start; ms)",
              ["seconds", "requests", "unanswered", "p50", "p99", "max"],
              report.start_timeline),
        table("2. Memory (MiB; PSS and anonymous PSS from /proc/PID/smaps_rollup)",
              ["process", "count", "PSS median", "PSS max", "anon median", "anon max"],
              memory_rows(report.memory)),
        table(f"Workers per host implied ({BUDGET_MIB // 1024} GiB / anonymous PSS)",
              ["worker", "at the median", "at the max"], capacity_rows(report.memory)),
        table(f"3. Schedule lag at {FREQUENCY} s (ms; snapshot start minus the"
              " next_snapshot_due the worker announced before it)",
              ["observed (s)", "snapshots", "p50", "p99", "max", "min"], lag_rows(report)),
        table("4. RELOAD of a big change", ["step", "time (s unless said)"], report.reload),
        "### 5. CPU per snapshot vs upstream\n\nSee benchmarks/snapshot_bench.py"
        " (not measured here).\n",
    ]
    if report.notes:
        lines.append("### Notes\n\n" + "\n".join(f"* {n}" for n in report.notes) + "\n")
    return "\n".join(lines)


def log_notes(fleet_dir: Path) -> list[str]:
    """The warnings and errors of the fleet's logs, counted by program kind and message."""
    counted: Counter[str] = Counter()
    for path in sorted((fleet_dir / "logs").glob("*.log")):
        kind = re.sub(r"_\d+$", "_N", path.stem)
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"\b(WARN(ING)?|ERROR|CRIT(ICAL)?|Traceback)\b", line):
                message = re.sub(r"^\S+ \S+ ", "", line)
                message = re.sub(r"\d+(\.\d+)?", "#", message)[:160]
                counted[f"{kind}: {message}"] += 1
    if not counted:
        return ["no warning nor error in the fleet's logs"]
    return [f"{count} x {text}" for text, count in counted.most_common(15)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=800)
    parser.add_argument("--observe", type=float, default=330,
                        help="seconds of schedule observation (at least one period: 300)")
    parser.add_argument("--settle", type=float, default=10,
                        help="seconds between the start and the at-rest readings")
    parser.add_argument("--keep", action="store_true",
                        help="leave the fleet, Redis and the clusters running, for inspection")
    parser.add_argument("--quick", action="store_true",
                        help="a validation run: 100 servers, 60 s of observation")
    args = parser.parse_args()
    if args.quick:
        args.servers, args.observe = 100, 60
    base = Path(tempfile.mkdtemp(prefix="powa-fleet-scale-"))
    sandbox.give_to_postgres(base)
    report = Report(args.servers)
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, base, ignore_errors=True)
        try:
            bench(args, base, stack, report)
        except BaseException:
            print(render(report), file=sys.stderr)
            raise
        finally:
            if (base / "fleet").is_dir():
                report.notes += log_notes(base / "fleet")
            if args.keep:
                stack.pop_all()
                print(f"kept running in {base}: supervisord -c {base}/fleet/supervisord.conf,"
                      " redis-server and the clusters there (pg_ctl -D ... stop) are yours to"
                      " stop", file=sys.stderr)
    print(header(f"A host's worth: {args.servers} servers (issue 14)"))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
