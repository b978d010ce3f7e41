"""PoWA 5 test helpers: workloads with several databases, upstream's collector, repository views.

The clusters are PostgreSQL 17 with PoWA 5.0.2 (``sandbox.powa5()``: the host's
packages on Debian 13, else the tree of ``scripts/powa5-tree.sh``).
"""

from __future__ import annotations

import subprocess

from psycopg import sql

from collector.demo import sandbox
from tests.helpers import PYTHON, ROOT, Repo

#: the second database of a workload, with tables, an index and a function
SHOP = "shop"

#: one snapshot by upstream powa-collector's own worker code (PyPI, the dev extra)
UPSTREAM_DRIVER = """
import logging, sys
from powa_collector.powa_worker import PowaThread
logging.basicConfig(level=logging.WARNING)
repo_dsn, host, port, srvid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = {"dsn": {"host": host, "port": port, "user": "postgres", "dbname": "powa"},
          "frequency": 300, "alias": f"upstream-{srvid}", "srvid": srvid}
worker = PowaThread(config["alias"], {"dsn": repo_dsn}, config, False)
worker._PowaThread__check_powa()
worker._PowaThread__take_snapshot()
"""


def create_workload(remote: sandbox.Cluster, statements: int = 300, dbname: str = SHOP) -> None:
    """``statements`` distinct statements in powa, and a second database with tables."""
    sandbox.create_workload(remote, statements)
    with remote.connect("postgres") as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    with remote.connect(dbname) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, amount numeric)")
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO orders SELECT i, i * 1.5 FROM generate_series(1, 500) i")
        conn.execute("INSERT INTO customers SELECT i, 'c' || i FROM generate_series(1, 50) i")
        conn.execute("CREATE FUNCTION total() RETURNS numeric LANGUAGE plpgsql"
                     " AS $$ BEGIN RETURN (SELECT sum(amount) FROM orders); END $$")
        conn.execute("SET track_functions = 'all'")
        for i in range(1, 20):
            conn.execute("SELECT * FROM orders WHERE id = %s", (i,))
            conn.execute("SELECT total()")
        conn.execute("ANALYZE")


def upstream_snapshot(repo: Repo, remote: sandbox.Cluster, srvid: int) -> None:
    """One snapshot of ``remote`` by upstream powa-collector 1.3.2, as its thread takes it."""
    done = subprocess.run(
        [PYTHON, "-c", UPSTREAM_DRIVER, repo.dsn, remote.host, str(remote.port), str(srvid)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr


def filled_tables(repo: Repo, srvid: int) -> set[str]:
    """Every table of the powa schema holding rows of server ``srvid``."""
    tables = [str(r[0]) for r in repo.all(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'srvid'"
        " JOIN pg_extension e ON e.extname = 'powa' AND e.extnamespace = n.oid"
        " WHERE c.relkind = 'r'"
    )]
    with repo.connect() as conn:
        return {
            table for table in tables
            if conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE srvid = %s)").format(
                sql.Identifier(table)), (srvid,)).fetchone() == (True,)
        }


def tmp_rows(repo: Repo, srvid: int) -> set[str]:
    """The _tmp tables (any name PoWA 5 gives them) holding rows of ``srvid``."""
    return {t for t in filled_tables(repo, srvid) if t.endswith("_tmp")}


def remote_database_oids(remote: sandbox.Cluster) -> dict[str, int]:
    with remote.connect("postgres") as conn:
        rows = conn.execute("SELECT datname, oid FROM pg_database WHERE datallowconn").fetchall()
    return {str(name): int(oid) for name, oid in rows}


def sessions(remote: sandbox.Cluster) -> int:
    """Sessions ever opened on the remote (PostgreSQL 14+ counts them per database)."""
    with remote.connect("postgres") as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
    assert row is not None
    return int(row[0])
