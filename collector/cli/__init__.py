"""Operator commands: ``python -m collector status|notify -c CFG ...``.

``status`` prints one line per server of the fleet: id, alias, program
state, status, last snapshot, its duration and the last error.
``notify`` sends a protocol request exactly as powa-web does and prints the
answer.

Exit status, for scripts:

========  ==============================================================
status    0 every enabled worker is ``running``; 1 some are not;
          5 supervisord or Redis could not be asked
notify    0 answer ``OK``; 1 any other answer; 5 no answer in time
both      2 bad command line or configuration
========  ==============================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
import redis
import simplejson as json

from collector import config, daemon, logs
from collector.cli.client import Client
from collector.control.board import DISABLED, StatusBoard, WorkerView
from collector.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, FleetError
from collector.keys import STATUS_RUNNING

COLUMNS = ("id", "alias", "program", "status", "last snapshot", "duration", "last error")


def _short_time(text: object) -> str:
    if not isinstance(text, str):
        return "-"
    try:
        return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return text


def _cell(text: object, width: int) -> str:
    flat = " ".join(str(text).split()) if text not in (None, "") else "-"
    # aliases and errors are untrusted: no escape sequence reaches the terminal
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def row(view: WorkerView) -> dict[str, Any]:
    document = view.document or {}
    duration = document.get("last_snapshot_duration")
    return {
        "id": view.srvid,
        "alias": document.get("alias"),
        "program": view.program_state or ("disabled" if not view.enabled else "not loaded"),
        "status": view.status,
        "last snapshot": _short_time(document.get("last_snapshot_start")),
        "outcome": document.get("last_snapshot_outcome"),
        "duration": f"{duration:.2f}s" if isinstance(duration, int | float) else "-",
        "last error": document.get("last_error"),
    }


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    widths = {"id": 6, "alias": 18, "program": 9, "status": 32, "last snapshot": 19,
              "duration": 8, "last error": 60}
    print("  ".join(name.ljust(widths[name]) for name in COLUMNS).rstrip())
    for line in rows:
        print("  ".join(_cell(line[name], widths[name]).ljust(widths[name])
                        for name in COLUMNS).rstrip())


def status(cfg: config.Config, args: argparse.Namespace) -> int:
    board = StatusBoard(cfg)
    try:
        views = board.views(args.srvid)
    except (redis.RedisError, FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        board.close()
    rows = [row(view) for view in views]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print_table(rows)
    if args.srvid is not None and not views:
        print(f"error: server {args.srvid} is not in the fleet", file=sys.stderr)
        return EXIT_FAILURE
    if any(v.status.startswith("unknown") for v in views):
        return EXIT_UNAVAILABLE
    if any(v.status not in (STATUS_RUNNING, DISABLED) for v in views):
        return EXIT_FAILURE
    return EXIT_OK


def notify(cfg: config.Config, args: argparse.Namespace) -> int:
    try:
        with Client(cfg.repository.dsn, cfg.repository.connect_timeout) as client:
            answers = client.ask(args.command, args.args, timeout=args.timeout)
    except psycopg.Error as exc:
        print(f"error: cannot reach the repository: {logs.one_line(exc)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if not answers:
        print(f"error: no answer to {args.command} within {args.timeout}s: is the control "
              "process running?", file=sys.stderr)
        return EXIT_UNAVAILABLE
    answer = answers[0]
    print(f"{answer.status} {answer.data}")
    return EXIT_OK if answer.status == "OK" else EXIT_FAILURE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m collector",
                                     description="Operate a powa-fleet.")
    daemon.config_argument(parser)
    commands = parser.add_subparsers(dest="action", required=True)
    show = commands.add_parser("status", help="one line per server: program, status, last "
                                              "snapshot, last error")
    show.add_argument("srvid", nargs="?", type=int, help="only this server")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    ask = commands.add_parser("notify", help="send a collector protocol request like powa-web")
    ask.add_argument("command", help="RELOAD, WORKERS_STATUS, FORCE_SNAPSHOT, ...")
    ask.add_argument("args", nargs="*", help="arguments of the request")
    ask.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config)
    except FleetError as exc:
        return daemon.fatal("error", exc)
    logs.REDACTOR.add(*cfg.secrets())
    logs.setup("collector", "warning")
    return status(cfg, args) if args.action == "status" else notify(cfg, args)
