"""Checks of this machine: the configuration file, the fleet directory, Redis, the web UI port."""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import os
import socket
import xmlrpc.client
from dataclasses import dataclass
from urllib.parse import urlsplit

from collector import keys
from collector.cli.findings import Finding, fail, ok, warning
from collector.config import Config, is_loopback
from collector.errors import SupervisorError
from collector.fleet.supervisord import Supervisor
from collector.logs import one_line
from collector.syncredis import redis

#: seconds to wait for our own supervisord
SUPERVISOR_TIMEOUT = 5.0


@dataclass(frozen=True)
class OurFleet:
    """This fleet's supervisord, when it runs."""

    pid: int | None
    control_running: bool


def config_file(cfg: Config) -> list[Finding]:
    found = [ok("config", f"{cfg.path} is valid")]
    mode = cfg.path.stat().st_mode & 0o777
    if mode & 0o077 and cfg.secrets():
        found.append(warning(
            "config", f"{cfg.path} holds secrets and is readable by others (mode {mode:04o})",
            f"chmod 600 {cfg.path}",
        ))
    return found


def fleet_directory(cfg: Config) -> Finding:
    item = "fleet directory"
    if not os.access(cfg.directory, os.W_OK | os.X_OK):
        return fail(item, f"{cfg.directory} is not writable by this user",
                    "run as the fleet's user (sudo -u powa-fleet powa-fleet check), or give "
                    "it the directory (chown)")
    if not cfg.supervisord_conf.exists():
        return ok(item, f"{cfg.directory} is writable; nothing generated yet "
                        "(powa-fleet generate)")
    return ok(item, f"{cfg.directory} is writable")


def our_fleet(cfg: Config) -> OurFleet:
    """Is this fleet's supervisord running (its socket answers), and its control?"""
    if not cfg.supervisor_socket.exists():
        return OurFleet(None, False)
    try:
        control = Supervisor(cfg.supervisor_socket, SUPERVISOR_TIMEOUT).process(keys.CONTROL)
    except SupervisorError:
        return OurFleet(None, False)
    return OurFleet(_pidfile(cfg), control is not None and control.get("statename") == "RUNNING")


def _pidfile(cfg: Config) -> int | None:
    try:
        return int(cfg.supervisord_pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _redis_place(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


def redis_server(cfg: Config) -> list[Finding]:
    item, place = "redis", _redis_place(cfg.redis.url)
    client = keys.client(cfg.redis.url)
    try:
        client.ping()
    except redis.AuthenticationError:
        return [fail(item, f"Redis at {place} refused the password of [redis] url",
                     "put Redis's requirepass in the URL: redis://:PASSWORD@host:port/0")]
    except redis.RedisError as exc:
        return [fail(item, f"cannot reach Redis at {place}: {one_line(exc)}",
                     "start it (systemctl start redis-server), or fix [redis] url")]
    finally:
        client.close()
    return [ok(item, f"Redis at {place} answers"), _redis_protection(cfg.redis.url, place)]


def _redis_protection(url: str, place: str) -> Finding:
    parts = urlsplit(url)
    if parts.password:
        return ok("redis", "a password protects it")
    if parts.scheme == "unix" or is_loopback(parts.hostname or ""):
        return ok("redis", "reached on loopback only")
    if "ssl_certfile" in parts.query:
        return ok("redis", "a TLS client certificate protects it")
    # the configuration refuses this; kept for a check that must not trust it alone
    return warning("redis", f"{place} is a network address and the URL has no password: "
                            "anyone who reaches it can rewrite the fleet's statuses",
                   "set requirepass in redis.conf and redis://:PASSWORD@host:port/0 in "
                   "[redis] url, or use Redis on 127.0.0.1")


def web_ui(cfg: Config, fleet: OurFleet) -> Finding:
    item, address = "web UI", cfg.supervisor.http
    if not address:
        return ok(item, "disabled ([supervisor] http is empty)")
    host, _, port = address.rpartition(":")
    host = "" if host in ("", "*") else host.strip("[]")
    problem = _bind(host, int(port))
    if problem is None:
        return ok(item, f"{address} is free")
    if problem == errno.EADDRINUSE:
        if fleet.pid is not None and _http_pid(host, int(port), cfg) == fleet.pid:
            return ok(item, f"{address} is served by this fleet's supervisord (pid {fleet.pid})")
        return fail(item, f"{address} is in use by another program",
                    "choose a free address in [supervisor] http (ss -ltnp shows who holds it)")
    return fail(item, f"cannot listen on {address}: {os.strerror(problem)}",
                "use an address of this machine in [supervisor] http")


def _bind(host: str, port: int) -> int | None:
    """None when supervisord could listen on host:port, else the errno why not."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # as supervisord does: a port in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return exc.errno or errno.EADDRINUSE
    return None


def _http_pid(host: str, port: int, cfg: Config) -> int | None:
    """The pid of the supervisord answering XML-RPC on host:port, None if none does."""
    body = xmlrpc.client.dumps((), "supervisor.getPID").encode()
    headers = {"Content-Type": "text/xml"}
    if cfg.supervisor.password:
        token = f"{cfg.supervisor.username}:{cfg.supervisor.password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
    conn = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=SUPERVISOR_TIMEOUT)
    with contextlib.closing(conn):
        try:
            conn.request("POST", "/RPC2", body, headers)
            response = conn.getresponse()
            if response.status != 200:
                return None
            (pid,), _ = xmlrpc.client.loads(response.read())
            return pid if isinstance(pid, int) else None
        except (OSError, http.client.HTTPException, xmlrpc.client.Error, ValueError,
                TypeError):
            return None
