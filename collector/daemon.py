"""What the programs of a fleet share at start and at exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from collector import config, logs
from collector.errors import EXIT_CONFIG, EXIT_FAILURE, EXPECTED_EXIT_CODES, FleetError

STARTED = time.monotonic()
#: supervisord counts an exit before ``startsecs`` (3 s in the generated files,
#: collector.fleet.files.STARTSECS) as a failed start and retries it, whatever
#: its exit code
MIN_UPTIME = 3.5


def settle(code: int) -> int:
    """Delay an exit that supervisord must not retry until it can tell it is one.

    Not a configuration error: that exit is left fast, so that supervisord
    counts it a failed start and ends FATAL (not a quiet EXITED), where the
    control's healer starts it again with a backoff once the file is fixed.
    """
    if code and code in EXPECTED_EXIT_CODES and code != EXIT_CONFIG \
            and os.environ.get("SUPERVISOR_ENABLED"):
        time.sleep(max(0.0, MIN_UPTIME - (time.monotonic() - STARTED)))
    return code


def fatal(program: str, error: BaseException | str, code: int | None = None) -> int:
    """Print why ``program`` cannot go on, one redacted line a problem; its exit code.

    The code is ``code``, else the error's own (``FleetError.exit_code``), else
    EXIT_FAILURE; an exit supervisord must not retry is delayed until it can
    tell (``settle``).
    """
    if code is None:
        code = error.exit_code if isinstance(error, FleetError) else EXIT_FAILURE
    for line in str(error).splitlines() or ["failed"]:
        print(f"{program}: {logs.REDACTOR.redact(line)}", file=sys.stderr)
    return settle(code)


def config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="collector.cfg (default: $POWA_FLEET_CONFIG,"
                        " ./collector.cfg, /etc/powa-fleet/collector.cfg, then the checkout's)")


def load_config(program: str, path: str | None, level: str | None = None) -> config.Config:
    """The configuration, its secrets known to the redactor, logging set up.

    An invalid configuration is printed one problem a line, prefixed with the
    program's name, and ends the process with the error's exit status (2).
    """
    try:
        cfg = config.load(path)
    except FleetError as exc:
        raise SystemExit(fatal(program, exc)) from None
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
