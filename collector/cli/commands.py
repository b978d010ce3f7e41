"""The small operator commands: notify, once, ctl, generate."""

from __future__ import annotations

import argparse
import subprocess
import sys

import psycopg

from collector import config, daemon, logs
from collector.cli.client import Client
from collector.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, FleetError
from collector.fleet import generator


def notify(cfg: config.Config, args: argparse.Namespace) -> int:
    """Send a protocol request as powa-web does; 0 on an OK answer, 1 on another, 5 on none."""
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


def once(cfg: config.Config, args: argparse.Namespace) -> int:
    """One snapshot of one server, by the worker's own code (``collector.worker --once``).

    A child process: the operator commands do not import the worker side,
    and the worker reads the configuration itself, as under supervisord.
    """
    argv = [sys.executable, "-m", "collector.worker", "-c", str(cfg.path),
            "--srvid", str(args.srvid), "--once", *(["-v"] if args.verbose else [])]
    return subprocess.run(argv, check=False).returncode


def ctl(cfg: config.Config, args: argparse.Namespace) -> int:
    """supervisorctl on this fleet's supervisord (its -c is the one easy to forget)."""
    argv = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(cfg.supervisord_conf),
            *args.arguments]
    if not cfg.supervisord_conf.exists():
        print(f"error: {cfg.supervisord_conf} does not exist: run powa-fleet generate first",
              file=sys.stderr)
        return EXIT_FAILURE
    return subprocess.run(argv, check=False).returncode


def generate(args: argparse.Namespace) -> int:
    """create_supervisord_config.py's own code."""
    try:
        return generator.run(args)
    except FleetError as exc:
        return daemon.fatal("error", exc)
