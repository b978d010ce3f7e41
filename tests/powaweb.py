"""powa-web from PyPI against a fleet: its virtualenvs, its server, its own collector code.

powa-web is installed the way its users get it (pip, from PyPI) into a
virtualenv of its own, outside the checkout and cached between runs
(``$POWA_FLEET_CACHE``, default ``/var/cache/powa-fleet``).  None of it is
imported into the test process: its code runs under its own interpreter,
either as its ``powa-web`` server (the pages a user opens) or through
``DRIVER``, which builds one of powa-web's own request handlers and calls the
methods its pages call (``notify_collector``, the collectors widget), for what
no page shows as is (the raw answers, and anything past powa-web 5.3.1's
login, which refuses PoWA 5.0 repositories).
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from collector.demo import sandbox

CACHE = Path(os.environ.get("POWA_FLEET_CACHE", "/var/cache/powa-fleet"))
#: what powa-web 4's configuration page says when it finds no collector session
COLLECTOR_DOWN = "No PoWA collector daemon is running!"
#: pip's words when it cannot reach the index (rather than a package being wrong)
_OFFLINE = re.compile(
    r"Failed to establish a new connection: [^'\")]*|Temporary failure in name resolution|"
    r"Network is unreachable|No route to host|ProxyError|ConnectTimeout|ReadTimeout|"
    r"Read timed out|SSLError"
)


@dataclass(frozen=True)
class Release:
    """One powa-web release and what goes in its virtualenv."""

    version: str
    #: powa-web's own requirements, installed before it (it then goes in with
    #: --no-deps): psycopg2-binary is psycopg2 prebuilt, so nothing is compiled
    requirements: tuple[str, ...]

    @property
    def venv(self) -> Path:
        return CACHE / f"powa-web-{self.version}-venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


#: talks to PoWA 4.1 (Debian 12); needs SQLAlchemy 1.3, which PyPI no longer pairs with it
POWA_WEB_4 = Release("4.1.4", ("psycopg2-binary", "tornado", "sqlalchemy<1.4"))
#: talks to PoWA 5
POWA_WEB_5 = Release("5.3.1", ("psycopg2-binary", "tornado"))


class Unavailable(Exception):
    """powa-web cannot be installed here: the package index is out of reach."""


def install(release: Release) -> Path:
    """The release's virtualenv, built when missing or broken; Unavailable when offline."""
    if _installed(release):
        return release.venv
    CACHE.mkdir(parents=True, exist_ok=True)
    # built aside and renamed into place, so an interrupted build is never taken for one
    building = Path(tempfile.mkdtemp(prefix=f".powa-web-{release.version}-", dir=CACHE))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(building)],
                       check=True, capture_output=True, timeout=120)
        _pip(building, *release.requirements)
        _pip(building, "--no-deps", f"powa-web=={release.version}")
        shutil.rmtree(release.venv, ignore_errors=True)
        building.rename(release.venv)
    except OSError:
        if not _installed(release):  # else another run put one in place meanwhile
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if not _installed(release):
        raise RuntimeError(f"powa-web {release.version} installed in {release.venv} "
                           "but it does not import")
    return release.venv


def _installed(release: Release) -> bool:
    if not release.python.exists():
        return False
    found = subprocess.run(
        [str(release.python), "-c", "import powa, psycopg2, tornado; print(powa.__VERSION__)"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return found.returncode == 0 and found.stdout.strip() == release.version


def _pip(venv: Path, *args: str) -> None:
    """pip of this interpreter installing into ``venv`` (which has no pip of its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--quiet", "--no-input", "--disable-pip-version-check", "--retries", "2",
         "--timeout", "30", *args],
        capture_output=True, text=True, timeout=900, check=False,
        # SQLAlchemy 1.3 has no wheel for this Python: its pure-Python build is quick
        env={**os.environ, "DISABLE_SQLALCHEMY_CEXT": "1"},
    )
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    offline = _OFFLINE.search(output)
    if offline:
        errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
        raise Unavailable("; ".join([*errors[-1:], offline.group(0)]))
    raise RuntimeError(f"pip install {' '.join(args)} failed: {output}")


# ---------------------------------------------------------------- configuration
def write_config(directory: Path, dsn: str, port: int | None = None) -> Path:
    """A powa-web.conf whose one server, ``main``, is the repository of ``dsn``.

    The repository's user (and password, if any) are in the file: powa-web uses
    them whatever the login form says, as it does for its own ``user`` key.
    """
    params = conninfo_to_dict(dsn)
    server: dict[str, Any] = {
        "host": params.get("host", "127.0.0.1"),
        "port": str(params.get("port", 5432)),
        "database": params.get("dbname", "powa"),
        "user": params.get("user", "postgres"),
        "query": {"client_encoding": "utf8"},
    }
    if params.get("password"):
        server["password"] = params["password"]
    path = directory / "powa-web.conf"
    path.touch(mode=0o600)
    path.write_text(
        f"servers = {{'main': {server!r}}}\n"
        f"cookie_secret = {secrets.token_hex(16)!r}\n"
        f"port = {port or sandbox.free_port()}\n"
        "address = '127.0.0.1'\n"
    )
    return path


def config_port(config: Path) -> int:
    found = re.search(r"^port = (\d+)$", config.read_text(), re.M)
    assert found, config
    return int(found.group(1))


# ---------------------------------------------------------------- powa-web's own code
#: run by powa-web's interpreter: argv = config file, JSON list of actions;
#: prints a JSON list with one result per action
DRIVER = r"""
import json, sys

config, actions = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["powa-web", "--config=" + config]

from powa import make_app
from powa.config import AllCollectorsDetail
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine


class Connection:
    # all a RequestHandler asks of its HTTP connection before it writes
    def set_close_callback(self, callback):
        pass


class Handler(AllCollectorsDetail):
    # logged in to the configured server; its user comes from the config file
    def get_str_cookie(self, name, default=None):
        return "main" if name == "server" else default

    def finish(self, chunk=None):
        if chunk is not None:
            self.write(chunk)
        self.sent = b"".join(self._write_buffer).decode()


app = make_app(debug=False)
results = []
for action in actions:
    request = HTTPServerRequest(
        start_line=RequestStartLine("GET", "/config/allcollectors/", "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "127.0.0.1"}), connection=Connection())
    handler = Handler(app, request)
    if action[0] == "collectors":
        # the widget of the configuration page: HTML on powa-web 4, JSON on 5
        handler.get()
        handler.finish()
        results.append(handler.sent)
    else:
        _, command, args, timeout = action
        results.append(handler.notify_collector(command, args, timeout))
    for conn in handler._connections.values():
        conn.dispose() if hasattr(conn, "dispose") else conn.close()
print(json.dumps(results))
"""


def run_driver(venv: Path, config: Path, actions: list[list[Any]]) -> list[Any]:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-W", "ignore", "-c", DRIVER, str(config),
         json.dumps(actions)],
        capture_output=True, text=True, timeout=120, check=False, cwd=config.parent,
    )
    assert done.returncode == 0, done.stderr
    results: list[Any] = json.loads(done.stdout)
    return results


def collectors_widget(venv: Path, config: Path) -> str:
    """What powa-web sends for its configuration page's collectors widget."""
    widget: str = run_driver(venv, config, [["collectors"]])[0]
    return widget


def notify(venv: Path, config: Path, command: str, *args: str,
           timeout: float = 3.0) -> list[dict[str, str]]:
    """powa-web's ``notify_collector``: one ``{STATUS: DATA}`` per answer received."""
    answers: list[dict[str, str]] = run_driver(
        venv, config, [["notify", command, list(args), timeout]])[0]
    return answers


# ---------------------------------------------------------------- powa-web's server
@dataclass
class PowaWeb:
    """A running ``powa-web`` and a browser-like session with it (cookies)."""

    base: str
    process: subprocess.Popen[bytes]
    log: Path
    opener: urllib.request.OpenerDirector = field(
        default_factory=lambda: urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())))

    def login(self) -> str:
        """Log in as the configured user; the path powa-web lands on."""
        form = urllib.parse.urlencode(
            {"username": "postgres", "user": "postgres", "password": "", "server": "main"})
        with self.opener.open(f"{self.base}/login/", form.encode(), timeout=30) as response:
            landed: str = response.url
        return urllib.parse.urlsplit(landed).path

    def get(self, path: str) -> str:
        with self.opener.open(f"{self.base}{path}", timeout=30) as response:
            return bytes(response.read()).decode()

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def serving(venv: Path, config: Path) -> Iterator[PowaWeb]:
    """powa-web's own server (its ``powa-web`` script) on the config's loopback port."""
    port = config_port(config)
    log = config.parent / "powa-web.log"
    with log.open("ab") as out:
        # the script is run by its interpreter: its #! names the directory it was built in
        process = subprocess.Popen(
            [str(venv / "bin" / "python"), str(venv / "bin" / "powa-web"),
             f"--config={config}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=config.parent,
        )
    web = PowaWeb(f"http://127.0.0.1:{port}", process, log)
    try:
        sandbox.wait_for_port("127.0.0.1", port, timeout=30)
        yield web
    finally:
        sandbox.terminate(process, 10)
