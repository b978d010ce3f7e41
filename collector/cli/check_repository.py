"""Checks of the repository: reachable, PoWA and its version, rights, other collectors.

Works with PoWA 4.1 (``powa_functions`` is a table with ``extname``) and
PoWA 5 (a view with ``kind`` and ``name``): the columns are looked up, not
assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from collector import repository
from collector.cli.findings import Finding, fail, ok
from collector.cli.text import printable
from collector.config import Config
from collector.errors import FleetError
from collector.logs import one_line
from collector.pg import Conn, PowaExtension, powa_extension

ITEM = "repository"
#: the oldest PoWA the fleet collects
MIN_MAJOR = 4

_RIGHTS = """
SELECT
  (SELECT pg_catalog.bool_and(pg_catalog.has_table_privilege(c.oid, 'SELECT'))
     FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname = 'powa_servers'),
  (SELECT pg_catalog.bool_and(pg_catalog.has_table_privilege(c.oid, 'UPDATE'))
     FROM pg_catalog.pg_class c
     WHERE c.relnamespace = n.oid AND c.relname = 'powa_snapshot_metas'),
  (SELECT pg_catalog.bool_and(pg_catalog.has_function_privilege(p.oid, 'EXECUTE'))
     FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = n.oid AND p.proname = 'powa_take_snapshot')
FROM pg_catalog.pg_namespace n WHERE n.nspname = %s
"""
_RIGHT_NAMES = ("read powa_servers", "update powa_snapshot_metas", "run powa_take_snapshot")

_COLUMNS = """
SELECT a.attname FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = 'powa_functions' AND a.attnum > 0 AND NOT a.attisdropped
"""

_SESSIONS = """
SELECT application_name, pg_catalog.host(client_addr), pid FROM pg_catalog.pg_stat_activity
WHERE pg_catalog.starts_with(application_name, %s) AND pid <> pg_catalog.pg_backend_pid()
ORDER BY backend_start
"""


@dataclass
class RepositoryView:
    """What the remote checks need from the repository."""

    powa: PowaExtension
    servers: list[repository.Server] = field(default_factory=list)
    #: extensions the enabled snapshot sources of each server need on the remote
    needs: dict[int, set[str]] = field(default_factory=dict)


def check(cfg: Config, control_running: bool, timeout: int) -> tuple[list[Finding],
                                                                    RepositoryView | None]:
    """Every repository finding, and what the remote checks need (None if it cannot tell)."""
    try:
        with repository.session(cfg.repository.dsn, "check", timeout) as conn:
            return _check(conn, control_running)
    except FleetError as exc:
        return [fail(ITEM, str(exc), "check [repository] dsn, that the server runs and lets "
                     "this host and user in (pg_hba.conf), and this user's ~/.pgpass")], None
    except psycopg.Error as exc:
        return [fail(ITEM, f"cannot read it: {one_line(exc)}",
                     "check the rights of the role of [repository] dsn")], None


def _check(conn: Conn, control_running: bool) -> tuple[list[Finding], RepositoryView | None]:
    powa = powa_extension(conn)
    database = conn.info.dbname
    if powa is None:
        return [fail(ITEM, f"database {database!r} has no powa extension",
                     "point [repository] dsn at the PoWA database, or CREATE EXTENSION powa "
                     "CASCADE there")], None
    if powa.major < MIN_MAJOR:
        return [fail(ITEM, f"PoWA {powa.version}: powa-fleet needs PoWA 4 or later",
                     "ALTER EXTENSION powa UPDATE (powa-archivist 4.1 or later)")], None
    found = [ok(ITEM, f"{database!r} answers, PoWA {powa.version} (schema {powa.schema})")]
    found += _rights(conn, powa)
    view = RepositoryView(powa, repository.list_servers(conn, powa), _needs(conn, powa))
    found.append(ok(ITEM, f"{len(view.servers)} remote server(s) to collect in powa_servers"))
    found += other_collectors(conn, control_running)
    return found, view


def _rights(conn: Conn, powa: PowaExtension) -> list[Finding]:
    row = conn.execute(_RIGHTS, (powa.schema,)).fetchone()
    conn.commit()
    missing = [name for name, allowed in zip(_RIGHT_NAMES, row or (), strict=False)
               if not allowed]
    if not missing:
        return [ok(ITEM, "its role may " + ", ".join(_RIGHT_NAMES))]
    return [fail(ITEM, f"the role {conn.info.user!r} may not " + ", ".join(missing),
                 "use the role powa-web's collector uses (a superuser, or on PoWA 5 a member "
                 "of powa_admin), or GRANT what is missing")]


def _needs(conn: Conn, powa: PowaExtension) -> dict[int, set[str]]:
    columns = {str(r[0]) for r in conn.execute(_COLUMNS, (powa.schema,)).fetchall()}
    if "extname" in columns:
        # PoWA 4: NULL for the sources of PoWA itself (pg_stat_bgwriter)
        name, only = sql.Identifier("extname"), sql.SQL("true")
    elif {"kind", "name"} <= columns:
        # PoWA 5: kind 'module' rows are PoWA's own sources
        name, only = sql.Identifier("name"), sql.SQL("kind = 'extension'")
    else:
        return {}
    rows = conn.execute(sql.SQL(
        "SELECT srvid, pg_catalog.array_agg(DISTINCT {name}) FROM {functions}"
        " WHERE srvid > 0 AND operation = 'snapshot' AND enabled AND {name} IS NOT NULL"
        " AND {only} GROUP BY srvid"
    ).format(name=name, functions=powa.name("powa_functions"), only=only)).fetchall()
    conn.commit()
    return {int(srvid): {str(n) for n in names} for srvid, names in rows}


def other_collectors(conn: Conn, control_running: bool) -> list[Finding]:
    """Sessions of collectors serving this repository other than this fleet's control."""
    rows = conn.execute(_SESSIONS, (repository.CONTROL_SESSION_PREFIX,)).fetchall()
    conn.commit()
    # upstream's main thread and our control share the name's prefix (powa-web looks for it)
    fleet = [r for r in rows if str(r[0]).startswith(repository.CONTROL_SESSION_PREFIX
                                                         + "powa-fleet ")]
    upstream = [r for r in rows if r not in fleet]
    found = [fail("other collector", f"{printable(name)!r} from {addr or 'a local socket'} "
                  f"(repository backend pid {pid}) serves this repository",
                  "stop it (upstream powa-collector) before starting the fleet: both would "
                  "snapshot the same servers and answer powa-web")
             for name, addr, pid in upstream]
    extra = fleet[1:] if control_running else fleet
    found += [fail("other collector", f"another powa-fleet control, from "
                   f"{addr or 'a local socket'} (repository backend pid {pid}), serves this "
                   "repository", "run one fleet per repository: this fleet's control would "
                   "refuse to serve it") for _, addr, pid in extra]
    return found or [ok("other collector", "no other collector serves this repository")]
