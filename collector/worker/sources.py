"""What a snapshot copies, as the repository's PoWA version describes it.

PoWA 4.1: the ``snapshot`` rows of the table ``powa_functions`` (``module``),
every source function and ``_tmp`` table in the powa schema, ``query_cleanup``
run as stored.

PoWA 5: ``powa_functions`` is a view (``name, external``, no ``module``);
an ``external`` source lives in its extension's own schema, on each side;
``query_cleanup`` is a template whose ``{extension}`` placeholders become that
extension's schema on the remote, as a quoted identifier.  Beside those
global sources come the per-database modules (``powa_db_functions``) and the
catalogs (``powa_catalog_functions``), copied from each database of the
remote (collector.worker.databases).  Their ``tmp_table`` is text naming a
repository table: it is resolved by the repository itself (``to_regclass``)
into schema and name, then quoted, never pasted into a statement.

Everything is read in one query per kind, each object named with its schema.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psycopg import sql

from collector.pg import Conn, PowaExtension, composed

#: powa_catalog_functions' refresh interval, as upstream uses it
CATALOG_REFRESH = "1 year"


@dataclass(frozen=True)
class Source:
    """One enabled ``snapshot`` source of ``powa_functions``, resolved on both sides."""

    #: module (4.1) or name (5): the extension or module it belongs to
    name: str
    query_source: str
    function_name: str
    #: the remote's set-returning function and the repository's _tmp table (schema, name)
    remote_function: tuple[str, str] | None = None
    target: tuple[str, str] | None = None
    cleanup: sql.Composed | None = None
    #: why it cannot be copied or cleaned up (recorded as an error of the snapshot)
    problem: str | None = None
    cleanup_problem: str | None = None


@dataclass(frozen=True)
class DbSource:
    """A per-database module or a catalog: SQL run in each database that needs it."""

    name: str
    query_source: str
    #: schema and name of the repository's _tmp table (None: not found there)
    target: tuple[str, str] | None
    #: db modules: the databases it is enabled for (None: all); catalogs: None
    dbnames: frozenset[str] | None = None
    #: catalogs: databases refreshed recently enough
    excluded: frozenset[str] = frozenset()
    #: catalog rows have no ts column
    with_ts: bool = True

    def wanted_in(self, dbname: str) -> bool:
        return self.dbnames is None or dbname in self.dbnames


def copy_in(repo: Conn, target: tuple[str, str]) -> bytes:
    """``COPY <schema>.<_tmp table> FROM STDIN`` on the repository."""
    return composed(repo, ("copy in", target), lambda: sql.SQL("COPY {} FROM STDIN").format(
        sql.Identifier(*target)))


# ---------------------------------------------------------------- global sources
def global_sources(
    repo: Conn, powa: PowaExtension, srvid: int, remote_powa: PowaExtension,
    remote_schemas: Mapping[str, str],
) -> list[Source]:
    """The enabled snapshot sources of server ``srvid``, in PoWA's order."""
    if powa.major < 5:
        return _sources_4(repo, powa, srvid, remote_powa)
    return _sources_5(repo, powa, srvid, remote_powa, remote_schemas)


def _sources_4(
    repo: Conn, powa: PowaExtension, srvid: int, remote_powa: PowaExtension
) -> list[Source]:
    rows = repo.execute(composed(repo, ("sources 4", powa.schema), lambda: sql.SQL(
        "SELECT module, query_source, query_cleanup, function_name FROM {}"
        " WHERE srvid = %s AND operation = 'snapshot' AND enabled"
        " ORDER BY priority, module"
    ).format(powa.name("powa_functions"))), (srvid,)).fetchall()
    return [
        Source(
            name=str(module), query_source=str(source or ""), function_name=str(function),
            remote_function=(remote_powa.schema, str(source)) if source else None,
            target=(powa.schema, f"{source}_tmp") if source else None,
            # 4.1 stores it as plain SQL, run as-is by design
            cleanup=sql.Composed([sql.SQL(str(cleanup))]) if cleanup else None,
        )
        for module, source, cleanup, function in rows
    ]


_SOURCES_5 = """
SELECT f.name, f.external, f.query_source, f.query_cleanup, f.function_name, n.nspname
FROM {} AS f
LEFT JOIN pg_catalog.pg_extension AS e ON f.external AND e.extname = f.name
LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid = e.extnamespace
WHERE f.srvid = %s AND f.operation = 'snapshot' AND f.enabled
ORDER BY f.priority, f.name
"""


def _sources_5(
    repo: Conn, powa: PowaExtension, srvid: int, remote_powa: PowaExtension,
    remote_schemas: Mapping[str, str],
) -> list[Source]:
    rows = repo.execute(composed(repo, ("sources 5", powa.schema), lambda: sql.SQL(
        _SOURCES_5).format(powa.name("powa_functions"))), (srvid,)).fetchall()
    sources = []
    for name, external, source, cleanup, function, repo_schema in rows:
        remote_schema = remote_schemas.get(name) if external else remote_powa.schema
        local_schema = repo_schema if external else powa.schema
        problem = None
        if remote_schema is None:
            problem = f"Extension {name} is not installed on the remote server"
        elif local_schema is None:
            problem = f"Extension {name} is not installed on the repository server"
        rendered, cleanup_problem = render_cleanup(cleanup, remote_schemas)
        sources.append(Source(
            name=str(name), query_source=str(source or ""), function_name=str(function),
            remote_function=(str(remote_schema), str(source))
                            if source and remote_schema else None,
            target=(str(local_schema), f"{source}_tmp") if source and local_schema else None,
            cleanup=rendered, problem=problem, cleanup_problem=cleanup_problem,
        ))
    return sources


def render_cleanup(
    template: str | None, schemas: Mapping[str, str]
) -> tuple[sql.Composed | None, str | None]:
    """A PoWA 5 ``query_cleanup`` with each ``{extension}`` replaced by its quoted schema.

    (statement, None), or (None, why not): a malformed template, or an
    extension the remote does not have.  The template's own text comes from
    the repository's PoWA, as any source query does; the schema names come
    from the remote and only ever become quoted identifiers.
    """
    if not template:
        return None, None
    parts: list[sql.Composable] = []
    try:
        for text, field, spec, conversion in string.Formatter().parse(template):
            if text:
                parts.append(sql.SQL(text))
            if field is None:
                continue
            if spec or conversion or field not in schemas:
                return None, (f"query_cleanup {template!r}: no extension {field!r}"
                              " on the remote server")
            parts.append(sql.Identifier(schemas[field]))
    except ValueError as exc:
        return None, f"query_cleanup {template!r} is malformed: {exc}"
    return sql.Composed(parts), None


# ---------------------------------------------------------------- per-database sources
_TARGET = """
LEFT JOIN pg_catalog.pg_class AS c ON c.oid = pg_catalog.to_regclass(f.tmp_table)
LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
"""

_DB_MODULES = """
SELECT f.db_module, f.query_source, n.nspname, c.relname, f.dbnames
FROM {}(%s, %s) AS f
""" + _TARGET + """
WHERE f.operation = 'snapshot' AND f.enabled
ORDER BY f.priority, f.db_module
"""

_CATALOGS = """
SELECT f.catname, f.query_source, n.nspname, c.relname, f.excluded_dbnames
FROM {}(%s, %s, %s::interval) AS f
""" + _TARGET + """
ORDER BY f.catname
"""


def _target(schema: object, table: object) -> tuple[str, str] | None:
    return None if schema is None or table is None else (str(schema), str(table))


def db_modules(repo: Conn, powa: PowaExtension, srvid: int, version_num: int) -> list[DbSource]:
    """PoWA 5's enabled per-database modules of a server (upstream ignores ``enabled``)."""
    rows = repo.execute(
        sql.SQL(_DB_MODULES).format(powa.name("powa_db_functions")), (srvid, version_num)
    ).fetchall()
    return [
        DbSource(str(name), str(source or ""), _target(schema, table),
                 dbnames=None if dbnames is None else frozenset(dbnames))
        for name, source, schema, table, dbnames in rows
    ]


def catalogs(
    repo: Conn, powa: PowaExtension, srvid: int, version_num: int, refresh_all: bool
) -> list[DbSource]:
    """PoWA 5's catalogs; ``refresh_all`` asks for every database (NULL interval)."""
    interval = None if refresh_all else CATALOG_REFRESH
    rows = repo.execute(
        sql.SQL(_CATALOGS).format(powa.name("powa_catalog_functions")),
        (srvid, version_num, interval),
    ).fetchall()
    return [
        DbSource(str(name), str(source or ""), _target(schema, table),
                 excluded=frozenset(excluded or ()), with_ts=False)
        for name, source, schema, table, excluded in rows
    ]


def tmp_tables(sources: Sequence[Source], per_db: Sequence[DbSource]) -> set[tuple[str, str]]:
    """Every _tmp table a snapshot of these sources writes to."""
    tables = {s.target for s in sources if s.target is not None}
    return tables | {s.target for s in per_db if s.target is not None}
