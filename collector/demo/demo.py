"""make demo: the whole fleet running on this machine, in ``demo/``, with one command.

    python -m collector.demo [--dir DIR] [--frequency S] [--for SECONDS] [--clean]

Builds a throwaway repository cluster and three remote clusters with PoWA,
pg_stat_kcache and pg_qualstats, registers the remotes, writes
``demo/collector.cfg``, generates the fleet and runs supervisord in the
foreground.  supervisord owns everything that runs: the control process,
one worker per remote, a redis-server and a light workload on the remotes.
Ctrl-C stops it all, clusters included.  Running it again rebuilds the demo
from scratch; ``--clean`` removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from collector import config
from collector.demo import sandbox
from collector.errors import SupervisorError
from collector.fleet import files
from collector.fleet.supervisord import Supervisor

#: the checkout (collector/demo/demo.py is two levels down)
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "demo"
#: where the clusters go when the postgres user cannot reach the demo directory
SCRATCH = "/var/tmp"  # noqa: S108 - mkdtemp makes a private directory in it
REMOTES = 3


class Demo:
    def __init__(self, directory: Path, frequency: int, http_port: int,
                 install: sandbox.PgInstall = sandbox.HOST) -> None:
        self.dir = directory.absolute()
        #: PostgreSQL 15 + PoWA 4.1 from the host, or PostgreSQL 17 + PoWA 5 (POWA=5)
        self.install = install
        self.frequency = frequency
        self.http_port = http_port
        self.password = secrets.token_urlsafe(9)
        self.clusters: list[sandbox.Cluster] = []
        self.redis_port = sandbox.free_port()

    # ---------------------------------------------------------------- paths
    @property
    def cfg_path(self) -> Path:
        return self.dir / "collector.cfg"

    @property
    def pg_dir(self) -> Path:
        """Where the clusters live: inside the demo if the postgres user can get there."""
        return self.dir / "pg"

    def _make_pg_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.install.root is None and sandbox.postgres_can_enter(self.dir):
            self.pg_dir.mkdir()
        else:
            # e.g. a checkout under /root, or PoWA 5's tree: the clusters go where
            # their postgres can work
            outside = Path(tempfile.mkdtemp(prefix="powa-fleet-demo-",
                                            dir=self.install.scratch() or SCRATCH))
            self.pg_dir.symlink_to(outside)
        sandbox.give_to_postgres(self.pg_dir.resolve(), self.install)

    # ---------------------------------------------------------------- build
    def build(self) -> None:
        started = time.monotonic()
        clean(self.dir)
        self._make_pg_dir()
        say("creating a template cluster with PoWA (initdb)...")
        template = sandbox.make_template(self.pg_dir.resolve(), self.install)
        names = ["repository"] + [f"remote{i}" for i in range(1, REMOTES + 1)]
        for name in names:
            cluster = sandbox.clone(template, self.pg_dir.resolve() / name,
                                    install=self.install)
            cluster.start()
            self.clusters.append(cluster)
        shutil.rmtree(template, ignore_errors=True)
        repository, remotes = self.clusters[0], self.clusters[1:]
        with repository.connect() as conn:
            for i, remote in enumerate(remotes, 1):
                sandbox.register_remote(conn, remote, alias=f"demo remote {i}",
                                        frequency=self.frequency)
        for remote in remotes:
            sandbox.create_workload(remote, 300)
        self._write_files()
        cfg = config.load(self.cfg_path)
        report = files.generate(cfg, range(1, REMOTES + 1))
        say(f"fleet generated: {len(report.added)} workers, built in "
            f"{time.monotonic() - started:.1f}s")

    def _write_files(self) -> None:
        repository = self.clusters[0]
        self.cfg_path.write_text(f"""\
; written by make demo: a throwaway fleet, rebuilt on every run
[repository]
dsn = {repository.dsn()}

[redis]
url = redis://127.0.0.1:{self.redis_port}/0
prefix = powa

[supervisor]
http = 127.0.0.1:{self.http_port}
username = admin
password = {self.password}
include = services.conf

[collector]
use_server_alias = true
auto_enable = true

[plugins]
enabled =
""")
        self.cfg_path.chmod(0o600)
        python = shlex.quote(sys.executable)
        remotes = " ".join(shlex.quote(c.dsn()) for c in self.clusters[1:])
        (self.dir / "redis").mkdir(exist_ok=True)
        (self.dir / "services.conf").write_text(f"""\
; the demo's own services, started and stopped by the fleet's supervisord
[program:redis]
command = {shutil.which(sandbox.REDIS_SERVER) or sandbox.REDIS_SERVER} --port {self.redis_port} --bind 127.0.0.1 --save "" --appendonly no --dir {shlex.quote(str(self.dir / "redis"))}
priority = 100
autorestart = true
stdout_logfile = {self.dir / "logs" / "redis.log"}
redirect_stderr = true

[program:workload]
command = {python} -m collector.demo --workload {remotes}
priority = 990
autorestart = true
stopsignal = INT
stdout_logfile = {self.dir / "logs" / "workload.log"}
redirect_stderr = true
""")  # noqa: E501

    # ---------------------------------------------------------------- run
    def run(self, seconds: float | None) -> int:
        log = (self.dir / "logs" / "supervisord.out").open("ab")
        supervisord = subprocess.Popen(
            [str(Path(sys.executable).parent / "supervisord"), "-n", "-c",
             str(self.dir / "supervisord.conf")],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True,
            # supervisord applies its own umask only when it daemonizes: with -n,
            # the log files it creates would be 0644
            umask=0o077,
        )
        stop = {"asked": False}

        def ask_stop(signum: int, frame: object) -> None:
            stop["asked"] = True

        signal.signal(signal.SIGINT, ask_stop)
        signal.signal(signal.SIGTERM, ask_stop)
        try:
            if not self._wait_until_up(supervisord, 30):
                say(f"supervisord did not start: see {self.dir / 'logs' / 'supervisord.out'}")
                return 1
            self._instructions()
            deadline = time.monotonic() + seconds if seconds else None
            while not stop["asked"] and supervisord.poll() is None:
                if deadline and time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            say("stopping the demo...")
            sandbox.terminate(supervisord, 90)
            for cluster in self.clusters:
                cluster.stop()
            say("demo stopped: nothing of it is running (make demo-clean removes demo/)")
        return 0

    def _wait_until_up(self, supervisord: subprocess.Popen[bytes], timeout: float) -> bool:
        """True once this demo's supervisord answers on its socket and its web UI port."""
        socket_path = config.load(self.cfg_path).supervisor_socket
        deadline = time.monotonic() + timeout
        while supervisord.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(SupervisorError):
                if Supervisor(socket_path, timeout=2).state() == "RUNNING":
                    sandbox.wait_for_port("127.0.0.1", self.http_port, timeout=5)
                    return True
            time.sleep(0.1)
        return False

    def _instructions(self) -> None:
        repository = self.clusters[0]
        venv = Path(sys.executable).parent
        rel = os.path.relpath(self.dir, Path.cwd())
        psql = f'psql "{repository.dsn()}"'
        # text for the operator to copy, not SQL this program runs
        say(f"""
powa-fleet demo is running (supervisord in the foreground; Ctrl-C stops everything).

  web UI          http://127.0.0.1:{self.http_port}/   user admin, password {self.password}
  programs        {venv}/supervisorctl -c {rel}/supervisord.conf status
                  {venv}/supervisorctl -c {rel}/supervisord.conf stop worker_2
  fleet status    {venv}/python -m collector -c {rel}/collector.cfg status
  snapshots       {psql} -c "SELECT srvid, snapts, coalesce_seq - 1 AS snapshots, errors FROM powa_snapshot_metas ORDER BY srvid"
  worker status   redis-cli -p {self.redis_port} get powa:worker:1
  protocol        {venv}/python -m collector -c {rel}/collector.cfg notify WORKERS_STATUS
     (as psql)    {psql} -c "LISTEN r1" -c "NOTIFY powa_collector, 'WORKERS_STATUS r1'" -c "SELECT pg_sleep(1)"
  logs            {rel}/logs/

Each remote is snapshotted every {self.frequency}s; the first snapshots arrive within {self.frequency}s.
""")  # noqa: E501


def clean(directory: Path) -> None:
    """Stop whatever a previous demo left running in ``directory``, then remove it."""
    pidfile = directory / "supervisord.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(900):
            os.kill(pid, 0)
            time.sleep(0.1)
    pg_dir = directory / "pg"
    if pg_dir.exists():
        for pidfile in pg_dir.resolve().glob("*/postmaster.pid"):
            datadir = pidfile.parent
            # a PoWA 5 demo's clusters are PostgreSQL 17 ones, run from their tree
            modern = (datadir / "PG_VERSION").read_text().strip() != "15"
            install = sandbox.powa5() if modern else sandbox.HOST
            sandbox.Cluster(datadir, 0, install=install).stop("immediate")
        if pg_dir.is_symlink():
            shutil.rmtree(pg_dir.resolve(), ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)


def port_taken(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- workload
QUERIES = [
    "SELECT count(*) FROM wide WHERE {} = %s",
    "SELECT {}, count(*) FROM wide GROUP BY 1 ORDER BY 2 DESC LIMIT 3",
    "UPDATE wide SET {} = {} + 0 WHERE c0 = %s",
]


def workload(dsns: list[str]) -> int:
    """A light, endless mix of queries on the remotes, so there is something to collect."""
    running = {"yes": True}

    def stop(signum: int, frame: object) -> None:
        running["yes"] = False

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    rng = random.Random()
    conns: dict[str, psycopg.Connection[tuple[object, ...]]] = {}
    while running["yes"]:
        for dsn in dsns:
            try:
                conn = conns.get(dsn) or psycopg.connect(dsn, autocommit=True, connect_timeout=3)
                conns[dsn] = conn
                column = sql.Identifier(f"c{rng.randrange(sandbox.WIDE_COLUMNS)}")
                template = rng.choice(QUERIES)
                query = sql.SQL(template).format(
                    *[column] * template.count("{}"))
                params = (rng.randrange(50),) if "%s" in template else ()
                conn.execute(query, params)
            except psycopg.Error as exc:
                print(f"workload: {dsn.split()[1]}: {exc}".splitlines()[0], flush=True)
                conns.pop(dsn, None)
        time.sleep(0.3)
    for conn in conns.values():
        conn.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="demo directory")
    parser.add_argument("--frequency", type=int, default=10,
                        help="snapshot frequency of the remotes, seconds (min 5)")
    parser.add_argument("--http-port", type=int, default=9001,
                        help="web UI port (a free one if taken)")
    parser.add_argument("--for", dest="seconds", type=float,
                        help="stop by itself after this many seconds")
    parser.add_argument("--clean", action="store_true", help="stop and remove the demo")
    parser.add_argument("--powa", choices=("4", "5"), default="4",
                        help="PoWA 4.1 (PostgreSQL 15, Debian 12's packages) or PoWA 5"
                             " (PostgreSQL 17: Debian 13's packages, or the tree of"
                             " scripts/powa5-tree.sh)")
    parser.add_argument("--workload", nargs="+", metavar="DSN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workload:
        return workload(args.workload)
    if args.clean:
        clean(args.dir.absolute())
        say(f"removed {args.dir}")
        return 0
    port = args.http_port if args.http_port and not port_taken(args.http_port) else 0
    install = sandbox.powa5() if args.powa == "5" else sandbox.HOST
    demo = Demo(args.dir, max(5, args.frequency), port or sandbox.free_port(), install)
    try:
        demo.build()
    except BaseException:
        for cluster in demo.clusters:
            cluster.stop("immediate")
        raise
    return demo.run(args.seconds)


if __name__ == "__main__":
    sys.exit(main())
