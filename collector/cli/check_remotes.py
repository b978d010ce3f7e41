"""Checks of every collected remote server, in parallel threads with a bound.

Each server is reached with the settings of its ``powa_servers`` row (as its
worker would, password and ~/.pgpass included) and a short connect timeout;
64 at a time, so that a fleet of 500 unreachable servers takes about eight
timeouts, not 500.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import psycopg

from collector.cli.check_repository import RepositoryView
from collector.cli.findings import Finding, fail, ok
from collector.cli.text import printable
from collector.logs import REDACTOR, one_line
from collector.pg import PowaExtension, powa_extension
from collector.repository import Server

MAX_THREADS = 64
#: seconds: enough for a server that is up, short for one that is not
CONNECT_TIMEOUT = 5


def check(view: RepositoryView, connect_timeout: int) -> list[Finding]:
    if not view.servers:
        return []
    probe = partial(check_server, repository=view.powa, needs=view.needs,
                    timeout=min(connect_timeout, CONNECT_TIMEOUT))
    with ThreadPoolExecutor(min(MAX_THREADS, len(view.servers))) as pool:
        return [finding for found in pool.map(probe, view.servers) for finding in found]


def item(server: Server) -> str:
    alias = f"{printable(server.alias)!r}, " if server.alias else ""
    return f"server {server.srvid} ({alias}{printable(server.hostname)}:{server.port})"


def check_server(server: Server, repository: PowaExtension, needs: dict[int, set[str]],
                 timeout: int) -> list[Finding]:
    """The findings of one remote server."""
    REDACTOR.add(server.password)
    name = item(server)
    try:
        with psycopg.connect(
            host=server.hostname, port=server.port, user=server.username,
            password=server.password, dbname=server.dbname, connect_timeout=timeout,
            application_name="powa-fleet check", autocommit=True,
        ) as conn:
            powa = powa_extension(conn)
            installed = {str(r[0]) for r in conn.execute(
                "SELECT extname FROM pg_catalog.pg_extension").fetchall()}
    except psycopg.Error as exc:
        return [fail(name, f"unreachable with its powa_servers row: {one_line(exc)}",
                     "start it, or fix its row (hostname, port, username, dbname) or the "
                     "fleet user's ~/.pgpass and the server's pg_hba.conf; "
                     f"SELECT powa_deactivate_server({server.srvid}) stops collecting it")]
    found = _version(name, server, powa, repository)
    missing = sorted(needs.get(server.srvid, set()) - installed)
    if missing:
        found.append(fail(name, "extensions its enabled sources need are missing: "
                          + ", ".join(missing),
                          f"CREATE EXTENSION them in database {printable(server.dbname)!r} "
                          "of the remote, or on the repository SELECT "
                          f"powa_deactivate_extension({server.srvid}, 'NAME')"))
    if not found:
        found.append(ok(name, f"reachable, PoWA {powa.version if powa else '?'}, "
                              "the extensions of its sources are there"))
    return found


def _version(name: str, server: Server, powa: PowaExtension | None,
             repository: PowaExtension) -> list[Finding]:
    if powa is None:
        return [fail(name, f"no powa extension in database {printable(server.dbname)!r}",
                     "CREATE EXTENSION powa CASCADE there (powa-archivist of the "
                     "repository's version)")]
    if powa.major_minor != repository.major_minor:
        return [fail(name, f"PoWA {powa.version} on the remote, {repository.version} on the "
                           "repository: major.minor must match",
                     "install the repository's powa-archivist version on the remote "
                     "(ALTER EXTENSION powa UPDATE)")]
    return []
