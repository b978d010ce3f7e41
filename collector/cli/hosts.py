"""``powa-fleet hosts``: the live collector hosts of the fleet, their share and heartbeat.

Read from Redis (collector.hosts) and the repository (which servers are
collected, to compute each host's share as the hosts themselves do).  Exit
0 when this host is among the live ones, 1 when it is not (its control is
down, or refused), 5 when Redis cannot be asked.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

import psycopg
import simplejson as json

from collector import config, hosts, repository
from collector.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, RepositoryUnavailable
from collector.keys import client
from collector.logs import one_line
from collector.syncredis import redis

COLUMNS = ("host", "leader", "share", "leases", "heartbeat", "directory")


def _servers(cfg: config.Config) -> list[int] | None:
    try:
        with repository.session(cfg.repository.dsn, "hosts view",
                                cfg.repository.connect_timeout) as conn:
            return [s.srvid for s in repository.list_servers(conn, repository.require_powa(conn))]
    except (psycopg.Error, RepositoryUnavailable) as exc:
        print(f"note: shares unknown, the repository cannot be read: {one_line(exc)}",
              file=sys.stderr)
        return None


def rows(live: dict[str, dict[str, Any]], servers: list[int] | None,
         now: float) -> list[dict[str, Any]]:
    share = hosts.shares(servers, live) if servers is not None else {}
    return [{
        "host": name,
        "leader": bool(document.get("leader")),
        "share": len(share[name]) if name in share else None,
        "leases": document.get("servers"),
        "heartbeat": round(now - float(document.get("beat") or now), 1),
        "directory": document.get("directory"),
    } for name, document in sorted(live.items())]


def hosts_view(cfg: config.Config, args: argparse.Namespace) -> int:
    with contextlib.closing(client(cfg.redis.url)) as connection:
        try:
            live = hosts.Membership(cfg, connection).live()
        except redis.RedisError as exc:
            print(f"error: cannot read the live hosts from Redis: {one_line(exc)}",
                  file=sys.stderr)
            return EXIT_UNAVAILABLE
    table = rows(live, _servers(cfg), time.time())
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        grid = [list(COLUMNS)] + [
            [str(line["host"]), "yes" if line["leader"] else "",
             "-" if line["share"] is None else str(line["share"]),
             str(line["leases"] if line["leases"] is not None else "-"),
             f"{line['heartbeat']:.1f}s ago", str(line["directory"])]
            for line in table]
        widths = [max(len(cells[i]) for cells in grid) for i in range(len(COLUMNS))]
        for cells in grid:
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    if cfg.fleet.host not in live:
        print(f"note: this host ({cfg.fleet.host}) is not among the live hosts: is its"
              " control running?", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
