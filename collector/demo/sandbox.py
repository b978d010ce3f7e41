"""Throwaway PostgreSQL clusters with PoWA, and redis-servers, for tests, demo and benchmarks.

A template cluster is made once with ``initdb`` (as the ``postgres`` user
when running as root, since ``initdb`` refuses root) with every PoWA
extension created in database ``powa``; each cluster of a fleet is a copy of
it, which takes a fraction of a second.  Nothing here is used by the
collector itself.

Clusters run the host's PostgreSQL 15 with PoWA 4.1 (``HOST``) by default;
``powa5()`` gives PostgreSQL 17 with PoWA 5: the host's own packages on
Debian 13, else the Debian 13 tree that ``scripts/powa5-tree.sh`` builds,
whose programs run through ``chroot`` (data directories live inside the
tree, see ``workspace()``), reached over TCP like any remote server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from collector.pg import Conn

PG_BIN = Path(os.environ.get("POWA_FLEET_PG_BIN", "/usr/lib/postgresql/15/bin"))
#: the Debian 13 tree of scripts/powa5-tree.sh (PostgreSQL 17, PoWA 5)
POWA5_TREE = Path(os.environ.get("POWA_FLEET_POWA5_TREE", "/var/cache/powa-fleet/trixie"))
PG17_BIN = Path("/usr/lib/postgresql/17/bin")
PG17_EXTENSIONS = Path("/usr/share/postgresql/17/extension")
REDIS_SERVER = os.environ.get("POWA_FLEET_REDIS_SERVER", "redis-server")
PRELOAD = "pg_stat_statements,powa,pg_stat_kcache,pg_qualstats"
EXTENSIONS = ("pg_stat_statements", "btree_gist", "powa", "pg_stat_kcache", "pg_qualstats")
SERVER_SETTINGS = {
    "shared_preload_libraries": PRELOAD,
    # remote mode: no background worker, the collector does the snapshots
    "powa.frequency": "-1",
    "pg_stat_statements.max": "10000",
    "pg_qualstats.sample_rate": "1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, and never one this process handed out before.

    A port is only taken once its server starts, often long after it was
    picked (the demo picks the web UI's port before starting its clusters), and
    the kernel may give a just-closed port again: remembering what was handed
    out keeps two servers of one run from being told the same port.
    """
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _as_postgres(args: Sequence[str | os.PathLike[str]]) -> list[str]:
    argv = [str(a) for a in args]
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass(frozen=True)
class PgInstall:
    """Where the PostgreSQL programs of a sandbox live: on the host, or in a chroot tree."""

    bin: Path
    #: a chroot tree the programs run in (as its own postgres user), None for the host
    root: Path | None = None
    #: settings this installation needs on top of SERVER_SETTINGS
    settings: tuple[tuple[str, str], ...] = ()

    def argv(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """A command line run as the server user; Path arguments are host paths."""
        if self.root is None:
            return _as_postgres(args)
        inside = [self.inside(a) if isinstance(a, Path) else str(a) for a in args]
        return ["chroot", str(self.root), "runuser", "-u", "postgres", "--", *inside]

    def inside(self, path: Path) -> str:
        """A host path as the chrooted programs see it (paths outside the tree are
        taken as paths of the tree already, like ``bin``)."""
        if self.root is None or not path.resolve().is_relative_to(self.root.resolve()):
            return str(path)
        return "/" + str(path.resolve().relative_to(self.root.resolve()))

    def owner(self) -> tuple[int, int]:
        """uid and gid of the server user (the tree's own, which differ from the host's)."""
        if self.root is None:
            entry = pwd.getpwnam("postgres")
            return entry.pw_uid, entry.pw_gid
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "postgres":
                return int(fields[2]), int(fields[3])
        raise LookupError(f"no postgres user in {self.root}/etc/passwd")

    def scratch(self) -> Path | None:
        """Where temporary directories go (None: the system's default)."""
        return None if self.root is None else self.root / "tmp"


HOST = PgInstall(PG_BIN)


def _has_powa5(extensions: Path) -> bool:
    control = extensions / "powa.control"
    if not control.exists():
        return False
    return any(line.replace(" ", "").startswith("default_version='5")
               for line in control.read_text().splitlines())


def powa5(tree: Path | None = None) -> PgInstall:
    """PostgreSQL 17 with PoWA 5: native packages when the host has them, else the tree."""
    if tree is None and (PG17_BIN / "postgres").exists() and _has_powa5(PG17_EXTENSIONS):
        return PgInstall(PG17_BIN)
    root = tree or POWA5_TREE
    if not _has_powa5(root / PG17_EXTENSIONS.relative_to("/")):
        raise FileNotFoundError(
            f"no PoWA 5 in {root}: run scripts/powa5-tree.sh (make powa5) first"
        )
    # no /dev/shm in the tree
    return PgInstall(PG17_BIN, root, (("dynamic_shared_memory_type", "mmap"),))


def give_to_postgres(path: Path, install: PgInstall = HOST) -> None:
    """Make ``path`` (a directory the clusters live in) usable by the server user."""
    if os.geteuid() == 0:
        os.chown(path, *install.owner())


def postgres_can_enter(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(_as_postgres(["test", "-x", path, "-a", "-w", path]), check=False)
    return probe.returncode == 0


@dataclass
class Cluster:
    """One PostgreSQL server of the sandbox, listening on ``host:port`` over TCP only."""

    datadir: Path
    port: int
    host: str = "127.0.0.1"
    #: more loopback addresses to listen on (one cluster standing for many hosts)
    aliases: tuple[str, ...] = ()
    install: PgInstall = HOST

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.datadir.name}.log"

    def dsn(self, dbname: str = "powa", user: str = "postgres", **extra: str) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host, port=self.port, dbname=dbname, user=user, **extra
        )

    def connect(self, dbname: str = "powa", autocommit: bool = True) -> Conn:
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, connect_timeout=5)

    def configure(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (the last one wins)."""
        lines = "".join(
            "{} = '{}'\n".format(key, value.replace("'", "''")) for key, value in settings.items()
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(lines)

    def start(self) -> None:
        self.configure({"port": str(self.port),
                        "listen_addresses": ",".join((self.host, *self.aliases))})
        subprocess.run(
            self.install.argv(
                [self.install.bin / "pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w",
                 "-t", "60", "start"]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        subprocess.run(
            self.install.argv(
                [self.install.bin / "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop"]
            ),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def reload(self) -> None:
        subprocess.run(
            self.install.argv([self.install.bin / "pg_ctl", "-D", self.datadir, "reload"]),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def is_running(self) -> bool:
        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False


def make_template(base: Path, install: PgInstall = HOST) -> Path:
    """initdb a cluster with every PoWA extension in database ``powa``; return its datadir.

    With a chroot installation, ``base`` must lie inside its tree (see ``workspace()``).
    """
    datadir = base / "template"
    subprocess.run(
        install.argv(
            [install.bin / "initdb", "-D", datadir, "-A", "trust", "-U", "postgres", "-E",
             "UTF8", "--no-sync", "--locale=C"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    template = Cluster(datadir, free_port(), install=install)
    template.configure({**SERVER_SETTINGS, **dict(install.settings)})
    template.start()
    try:
        with template.connect("postgres") as conn:
            conn.execute("CREATE DATABASE powa")
        with template.connect() as conn:
            for extension in EXTENSIONS:
                conn.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(extension)))
    finally:
        template.stop()
    return datadir


def clone(
    template: Path, datadir: Path, host: str = "127.0.0.1", install: PgInstall = HOST
) -> Cluster:
    """A new cluster copied from the template, on a free port; not started."""
    subprocess.run(install.argv(["cp", "-a", template, datadir]), check=True)
    return Cluster(datadir, free_port(host), host, install=install)


def register_remote(
    repository: Conn,
    remote: Cluster,
    *,
    alias: str | None = None,
    frequency: int = 300,
    username: str = "postgres",
    password: str | None = None,
) -> int:
    """powa_register_server() for a sandbox remote; return its srvid."""
    repository.execute(
        """SELECT powa_register_server(hostname => %s, port => %s, alias => %s,
               username => %s, password => %s, dbname => 'powa', frequency => %s,
               extensions => '{pg_stat_kcache,pg_qualstats}')""",
        (remote.host, remote.port, alias, username, password, frequency),
    )
    row = repository.execute(
        "SELECT id FROM powa_servers WHERE hostname = %s AND port = %s", (remote.host, remote.port)
    ).fetchone()
    assert row is not None
    return int(row[0])


WIDE_COLUMNS = 60


def create_workload(remote: Cluster, statements: int = 200) -> None:
    """Run ``statements`` distinct queries (each with quals) so every source has data.

    Up to 3600 of them select one column of table ``wide`` filtered on another;
    beyond, a second selected column makes more shapes (pg_stat_statements
    tells queries apart by the columns they use, not by constants).
    """
    names = [sql.Identifier(f"c{i}") for i in range(WIDE_COLUMNS)]
    with remote.connect() as conn:
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS wide ({})").format(
                sql.SQL(", ").join(sql.SQL("{} int").format(n) for n in names)
            )
        )
        conn.execute(
            sql.SQL("INSERT INTO wide SELECT {} FROM generate_series(1, 50)").format(
                sql.SQL(", ").join(sql.Literal(i) for i in range(WIDE_COLUMNS))
            )
        )
        conn.execute("ANALYZE wide")
        square = WIDE_COLUMNS * WIDE_COLUMNS
        with conn.pipeline():
            for n in range(statements):
                extra, rest = divmod(n, square)
                i, j = divmod(rest, WIDE_COLUMNS)
                columns = [names[i]] + ([names[extra % WIDE_COLUMNS]] if extra else [])
                conn.execute(
                    sql.SQL("SELECT {} FROM wide WHERE {} = %s").format(
                        sql.SQL(", ").join(columns), names[j]
                    ),
                    (n,),
                )


class RedisServer:
    """A redis-server on a free port of ``host``, no persistence.

    With ``password``, clients must AUTH (an off-loopback Redis must ask for one);
    it reaches the server on its standard input, never on its command line.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 password: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, *(["-"] if self.password else []), "--port", str(self.port),
             "--bind", self.host, "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stdin=subprocess.PIPE if self.password else None,
        )
        if self.password and self.process.stdin is not None:
            self.process.stdin.write(f"requirepass {self.password}\n".encode())
            self.process.stdin.close()
        wait_for_port(self.host, self.port)

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process, 10)
        self.process = None


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process under it, found by parent pid (supervisord's
    children have process groups of their own): a machine gone at once.  ``root`` is
    stopped first so that it restarts nothing while its children die."""
    os.kill(root, signal.SIGSTOP)
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def terminate(process: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM a child and wait for it; SIGKILL if it takes longer than ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(0.05)


@contextlib.contextmanager
def workspace(prefix: str = "powa-fleet-", install: PgInstall = HOST) -> Iterator[Path]:
    """A temporary directory the postgres user can use, removed afterwards.

    For a chroot installation it lies inside the tree, where its programs see it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=install.scratch()))
    give_to_postgres(path, install)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
