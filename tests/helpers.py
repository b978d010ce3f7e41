"""Helpers shared by the tests: waiting, querying, running the programs."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis
import simplejson as json
from psycopg import sql

from collector import repository
from collector.cli.client import Client
from collector.control.admission import permission
from collector.demo import sandbox
from collector.pg import Conn

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll until ``predicate`` returns something truthy; fail the test with ``what`` if not."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


@dataclass
class Repo:
    """A fresh repository cluster with the sandbox remotes registered."""

    cluster: sandbox.Cluster
    srvids: list[int]

    @property
    def dsn(self) -> str:
        return self.cluster.dsn()

    def connect(self) -> Conn:
        return self.cluster.connect()

    def register(self, remote: sandbox.Cluster, alias: str, **options: Any) -> int:
        """powa_register_server() for one more remote; its srvid."""
        with self.connect() as conn:
            return sandbox.register_remote(conn, remote, alias=alias, **options)

    def one(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        with self.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return row[0] if row else None

    def all(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> None:
        with self.connect() as conn:
            conn.execute(query, params)

    def snapshots(self, srvid: int) -> int:
        """How many snapshots powa_take_snapshot stored for a server."""
        return int(self.one(
            "SELECT coalesce_seq - 1 FROM powa_snapshot_metas WHERE srvid = %s", (srvid,)
        ))

    def errors(self, srvid: int) -> list[str]:
        return list(self.one(
            "SELECT errors FROM powa_snapshot_metas WHERE srvid = %s", (srvid,)
        ) or [])

    def set_frequency(self, frequency: int, *srvids: int) -> None:
        for srvid in srvids or self.srvids:
            self.execute("UPDATE powa_servers SET frequency = %s WHERE id = %s", (frequency, srvid))

    def due_in(self, srvid: int, seconds: float, frequency: int) -> None:
        """Set a frequency and a last snapshot time so that the first snapshot of a
        worker is due ``seconds`` from now (it resumes from snapts).  The worker must
        read its row before that, else snapts is stale and it picks a random start
        within the period: with a long period, give it a few seconds to start."""
        self.execute("UPDATE powa_servers SET frequency = %s WHERE id = %s", (frequency, srvid))
        self.execute(
            "UPDATE powa_snapshot_metas SET snapts = now() - make_interval(secs => %s)"
            " WHERE srvid = %s", (frequency - seconds, srvid),
        )

    def tmp_rows(self, srvid: int) -> dict[str, int]:
        """Rows of a server left in any _tmp table of the repository."""
        tables = [r[0] for r in self.all(
            "SELECT relname FROM pg_class WHERE relname LIKE 'powa%%src_tmp' AND relkind = 'r'"
        )]
        with self.connect() as conn:
            counts = {
                table: conn.execute(
                    f"SELECT count(*) FROM {table} WHERE srvid = %s", (srvid,)
                ).fetchone()[0]  # type: ignore[index]
                for table in tables
            }
        return {t: c for t, c in counts.items() if c}

    def worker_sessions(self, srvid: int) -> list[tuple[str, str]]:
        """(state, query) of the repository sessions of a worker."""
        return [(r[0], r[1]) for r in self.all(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s",
            (f"powa-fleet worker {srvid}",),
        )]


@dataclass
class Fleet:
    """A fleet directory with its collector.cfg, pointing at a test repository and Redis."""

    directory: Path
    repo: Repo
    redis_url: str
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    http_port: int = field(default_factory=sandbox.free_port)
    extra: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def cfg_path(self) -> Path:
        return self.directory / "collector.cfg"

    def write_config(self, **sections: dict[str, str]) -> Path:
        base: dict[str, dict[str, str]] = {
            "repository": {"dsn": self.repo.dsn},
            "redis": {"url": self.redis_url, "prefix": self.prefix, "status_ttl": "6"},
            "supervisor": {"http": f"127.0.0.1:{self.http_port}", "username": "admin",
                           "password": "web-secret"},
            "collector": {"log_level": "debug", "stop_grace": "5", "connect_timeout": "2"},
        }
        for name, values in sections.items():
            base.setdefault(name.replace("__", ":"), {}).update(values)
        text = "".join(
            f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
            for name, values in base.items()
        )
        self.cfg_path.write_text(text + self.extra)
        return self.cfg_path

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def status(self, srvid: int) -> dict[str, Any] | None:
        with self.redis() as client:
            raw = client.get(f"{self.prefix}:worker:{srvid}")
        return json.loads(raw) if raw else None

    def run(self, *args: str, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a program of the project (argv after the interpreter) and wait for it."""
        return subprocess.run(
            [PYTHON, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            check=False, env=env,
        )

    def generate(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(ROOT / "create_supervisord_config.py"), "-c", str(self.cfg_path),
                        *args)

    def once(self, srvid: int, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "collector.worker", "-c", str(self.cfg_path), "--srvid",
                        str(srvid), "--once", timeout=timeout)

    def start_worker(self, srvid: int, log: Path | None = None) -> subprocess.Popen[bytes]:
        """A worker daemon as a child of the test (not under supervisord)."""
        out = (log or self.directory / f"worker_{srvid}.log").open("ab")
        process = subprocess.Popen(
            [PYTHON, "-m", "collector.worker", "-c", str(self.cfg_path), "--srvid", str(srvid)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        out.close()
        self.processes.append(process)
        return process

    def log(self, srvid: int) -> str:
        path = self.directory / f"worker_{srvid}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process(process)


def password_remote(cluster: sandbox.Cluster, password: str) -> None:
    """Only the role 'collector', with ``password`` (scram), may log in, beside postgres."""
    with cluster.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE collector LOGIN SUPERUSER PASSWORD {}").format(
            sql.Literal(password)))
    (cluster.datadir / "pg_hba.conf").write_text(
        "host all postgres 127.0.0.1/32 trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )
    cluster.reload()


def web_ui(port: int, auth: tuple[str, str] | None) -> tuple[int, str]:
    """GET the supervisord web UI page: (HTTP status, page)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def web_states(page: str) -> dict[str, str]:
    """Program name -> state text, as the rows of the web UI's status table show them."""
    states = {}
    for row in re.findall(r"<tr.*?</tr>", page, re.S):
        state = re.search(r'class="status\w+">([^<]+)<', row)
        name = re.search(r"processname=([\w:.-]+)", row)
        if state and name:
            states[name.group(1)] = state.group(1)
    return states


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    return sandbox.terminate(process, timeout)


@contextmanager
def stopped(cluster: sandbox.Cluster) -> Iterator[None]:
    """A cluster stopped for the duration of the block, started again after."""
    cluster.stop()
    try:
        yield
    finally:
        cluster.start()


def proc_text(pid: int, name: str) -> str:
    """/proc/<pid>/<name> as text (cmdline and environ are NUL separated)."""
    return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b" ").decode(
        errors="replace"
    )


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def polled_status(dsn: str, *srvid: str) -> dict[str, str]:
    """WORKERS_STATUS for a wait: no answer yet (a control still starting) is an empty one."""
    with Client(dsn) as client:
        answers = client.ask("WORKERS_STATUS", srvid, timeout=1)
    if not answers or answers[0].status != "OK":
        return {}
    return json.loads(answers[0].data)  # type: ignore[no-any-return]


def permission_verdicts(repo: Repo, granted: str) -> dict[str, bool | None]:
    """The control's admission check (collector.control.admission) of real sessions.

    ``granted``: the role a new role ``allowed`` is made a member of.
    """
    repo.execute("CREATE ROLE viewer LOGIN")
    repo.execute(f'CREATE ROLE allowed LOGIN IN ROLE "{granted}"')
    with repo.connect() as control:
        control.autocommit = True
        powa = repository.require_powa(control)
        verdicts: dict[str, bool | None] = {}
        for role in ("postgres", "viewer", "allowed"):
            with psycopg.connect(repo.cluster.dsn(user=role)) as session:
                verdicts[role] = permission(control, powa, session.info.backend_pid)
                pid = session.info.backend_pid
        # the last session ended: its pid names no backend
        wait_for(lambda: repo.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                  (pid,)) == 0, 5, "the session to end")
        verdicts["gone"] = permission(control, powa, pid)
    return verdicts
