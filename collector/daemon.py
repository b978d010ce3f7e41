"""What the programs of a fleet share at start and at exit."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from collector import config, logs
from collector.errors import FleetError


def config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="collector.cfg (default: $POWA_FLEET_CONFIG, "
                        "else the checkout's collector.cfg)")


def load_config(program: str, path: str | None, level: str | None = None) -> config.Config:
    """The configuration, its secrets known to the redactor, logging set up.

    An invalid configuration is printed one problem a line, prefixed with the
    program's name, and ends the process with the error's exit status (2).
    """
    try:
        cfg = config.load(path)
    except FleetError as exc:
        for line in str(exc).splitlines():
            print(f"{program}: {line}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    logs.REDACTOR.add(*cfg.secrets())
    logs.setup(program, level or cfg.collector.log_level)
    return cfg


def teardown(log: logging.Logger, steps: Sequence[tuple[str, Callable[[], object]]]) -> None:
    """Run each shutdown step on its own: one failing does not skip the others."""
    for name, step in steps:
        try:
            step()
        except Exception:
            log.exception("shutdown step %s failed", name)
    log.info("stopped")
