"""``powa-fleet status``: one line per server of the fleet.

The table joins three sources: supervisord (program state), the workers'
status documents in Redis, and the repository (``powa_servers.alias`` and
``powa_snapshot_metas.snapts``, one query for the whole fleet), so that a
server still shows its alias and its last snapshot when its worker has not
published them (disabled, just restarted, stopped).

"last error" is only shown while it is current: always next to a status
other than ``running`` (it explains that status); next to ``running``, only
when it is an error of the last snapshot (the snapshot stored errors or
failed, and the error was recorded after it started).  An error from before
the last snapshot, such as a connection lost and found again, is history.

Exit status: 0 every enabled worker is ``running``; 1 some are not (or the
server asked for is not in the fleet); 5 supervisord or Redis could not be
asked.  The repository being away only loses its two columns (a note on
stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import simplejson as json
from psycopg import sql

from collector import config, repository
from collector.cli.text import clip, printable
from collector.control.board import DISABLED, StatusBoard, WorkerView
from collector.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, FleetError
from collector.keys import STATUS_RUNNING
from collector.logs import one_line
from collector.syncredis import redis

COLUMNS = ("id", "alias", "host", "program", "status", "last snapshot", "duration",
           "last error")
#: aliases are free text of powa_servers: a long one must not push the table away
ALIAS_WIDTH = 32
#: the status table waits this long at most for the repository
REPOSITORY_TIMEOUT = 5


@dataclass(frozen=True)
class RepositoryFacts:
    """What the repository knows of every remote server."""

    aliases: dict[int, str | None] = field(default_factory=dict)
    snapts: dict[int, datetime] = field(default_factory=dict)


def repository_facts(cfg: config.Config) -> RepositoryFacts:
    """Aliases and last snapshot times of all servers; FleetError when the repository is away."""
    timeout = min(cfg.repository.connect_timeout, REPOSITORY_TIMEOUT)
    with repository.session(cfg.repository.dsn, "status", timeout) as conn:
        try:
            powa = repository.require_powa(conn)
            rows = conn.execute(sql.SQL(
                "SELECT s.id, s.alias, m.snapts FROM {} s LEFT JOIN {} m"
                " ON m.srvid = s.id AND m.snapts > '-infinity' WHERE s.id > 0"
            ).format(powa.name("powa_servers"), powa.name("powa_snapshot_metas"))).fetchall()
        except psycopg.Error as exc:
            raise FleetError(one_line(exc)) from None
    facts = RepositoryFacts()
    for srvid, alias, snapts in rows:
        facts.aliases[int(srvid)] = alias
        if snapts is not None:
            facts.snapts[int(srvid)] = snapts
    return facts


def _short_time(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if not isinstance(value, str):
        return "-"
    try:
        return _short_time(datetime.fromisoformat(value))
    except ValueError:
        return value


def _when(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def current_error(status: str, document: Mapping[str, Any]) -> str | None:
    """The worker's last error if it is still current (see the module docstring)."""
    error = document.get("last_error")
    if not error:
        return None
    if status != STATUS_RUNNING:
        return str(error)
    if document.get("last_snapshot_outcome") not in ("errors", "failed"):
        return None
    at, start = _when(document.get("last_error_at")), _when(document.get("last_snapshot_start"))
    return str(error) if at and start and at >= start else None


def row(view: WorkerView, facts: RepositoryFacts) -> dict[str, Any]:
    document = view.document or {}
    duration = document.get("last_snapshot_duration")
    last = document.get("last_snapshot_start") or facts.snapts.get(view.srvid)
    return {
        "id": view.srvid,
        "alias": document.get("alias") or facts.aliases.get(view.srvid),
        "host": document.get("host") or "-",
        "program": view.program_state or ("disabled" if not view.enabled else "not loaded"),
        "status": view.status,
        "last snapshot": _short_time(last),
        "outcome": document.get("last_snapshot_outcome"),
        "duration": f"{duration:.2f}s" if isinstance(duration, int | float) else "-",
        "last error": current_error(view.status, document),
    }


def _cells(line: Mapping[str, Any]) -> list[str]:
    cells = [printable(line[name]) for name in COLUMNS]
    cells[1] = clip(cells[1], ALIAS_WIDTH)
    return cells


def table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines of the table: every column as wide as its content, the last error last."""
    grid = [list(COLUMNS), *(_cells(line) for line in rows)]
    widths = [max(len(cells[i]) for cells in grid) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            .rstrip() for cells in grid]


def _views(cfg: config.Config, srvid: int | None) -> list[WorkerView]:
    board = StatusBoard(cfg)
    try:
        return board.views(srvid)
    finally:
        board.close()


def exit_code(views: Sequence[WorkerView]) -> int:
    if any(v.status.startswith("unknown") for v in views):
        return EXIT_UNAVAILABLE
    if any(v.status not in (STATUS_RUNNING, DISABLED) for v in views):
        return EXIT_FAILURE
    return EXIT_OK


def status(cfg: config.Config, args: argparse.Namespace) -> int:
    try:
        views = _views(cfg, args.srvid)
    except (redis.RedisError, FleetError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        facts = repository_facts(cfg) if views else RepositoryFacts()
    except FleetError as exc:
        print(f"note: aliases and last snapshots of the repository unknown: {exc}",
              file=sys.stderr)
        facts = RepositoryFacts()
    rows = [row(view, facts) for view in views]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print("\n".join(table(rows)))
    if args.srvid is not None and not views:
        print(f"error: server {args.srvid} is not in the fleet", file=sys.stderr)
        return EXIT_FAILURE
    return exit_code(views)
