"""Operator commands: ``powa-fleet COMMAND`` (also ``python -m collector COMMAND``).

========  ==============================================================
generate  powa_servers -> the fleet's supervisord files (create_supervisord_config.py)
status    one line per server: host, program, status, last snapshot, current error
hosts     the live collector hosts of the fleet: leader, share, heartbeat
notify    a protocol request, sent exactly as powa-web does, and its answer
check     everything a fleet needs, checked before anything starts
once N    one snapshot of server N now (the worker's ``--once``)
migrate   upstream's powa-collector.conf -> collector.cfg
ctl       supervisorctl on this fleet's supervisord (``-c`` given for you)
========  ==============================================================

Options (``-c``, ``--json``) are accepted before or after the command.  The
configuration is ``-c``, else ``$POWA_FLEET_CONFIG``, else ``./collector.cfg``,
else ``/etc/powa-fleet/collector.cfg`` (see ``collector.config.candidates``).

Exit status, for scripts (collector.errors has the one table):

========  ==============================================================
status    0 every enabled worker is ``running``; 1 some are not;
          5 supervisord or Redis could not be asked
hosts     0 this host is live; 1 it is not; 5 Redis could not be asked
notify    0 answer ``OK``; 1 any other answer; 5 no answer in time
check     0 all is well (warnings allowed); 1 something fails
once      the worker's: 0 stored, 1 failed, 3 unknown server, 4 not collected
migrate   0 written; 1 the target exists (no --force)
all       2 bad command line or configuration
========  ==============================================================
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from collector import __version__, config, daemon, logs
from collector.cli import check, commands, migrate
from collector.cli.hosts import hosts_view
from collector.cli.status import status
from collector.errors import FleetError
from collector.fleet import generator

CONFIG_HELP = ("collector.cfg (default: $POWA_FLEET_CONFIG, ./collector.cfg, "
               "/etc/powa-fleet/collector.cfg)")
#: commands that need a loaded configuration
WITH_CONFIG: dict[str, Callable[[config.Config, argparse.Namespace], int]] = {
    "status": status,
    "hosts": hosts_view,
    "notify": commands.notify,
    "once": commands.once,
    "ctl": commands.ctl,
}
#: commands that read (or write) the configuration themselves
ON_THEIR_OWN: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": check.check,
    "generate": commands.generate,
    "migrate": migrate.migrate,
}


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    """The options every command takes, before or after its name.

    On the commands' parsers they default to SUPPRESS, so that an option
    given before the command is not reset by the command's parser.
    """
    parser.add_argument("-c", "--config", default=None if top else argparse.SUPPRESS,
                        help=CONFIG_HELP)
    parser.add_argument("--json", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="machine-readable output (status, check)")


def _status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("srvid", nargs="?", type=int, help="only this server")


def _notify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("command", help="RELOAD, WORKERS_STATUS, FORCE_SNAPSHOT, ...")
    parser.add_argument("args", nargs="*", help="arguments of the request")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")


def _once(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("srvid", type=int, help="powa_servers.id of the server")
    parser.add_argument("-v", "--verbose", action="store_true", help="the worker's log on stderr")


def _ctl(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="supervisorctl's command and arguments (status, restart worker_3...)")


COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("generate", "write the fleet's supervisord files from powa_servers", generator.add_arguments),
    ("status", "one line per server: program, status, last snapshot, current error", _status),
    ("hosts", "the live collector hosts of the fleet: leader, share, heartbeat",
     lambda _: None),
    ("notify", "send a collector protocol request like powa-web", _notify),
    ("check", "check everything the fleet needs, before starting it", lambda _: None),
    ("once", "take one snapshot of one server now", _once),
    ("migrate", "write a collector.cfg from upstream's powa-collector.conf",
     migrate.add_arguments),
    ("ctl", "supervisorctl for this fleet (options of powa-fleet go before 'ctl')", _ctl),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="powa-fleet", description="Operate a powa-fleet.")
    parser.add_argument("--version", action="version", version=f"powa-fleet {__version__}")
    _common(parser, top=True)
    subparsers = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    for name, text, arguments in COMMANDS:
        sub = subparsers.add_parser(name, help=text, description=text)
        _common(sub, top=False)
        arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup("powa-fleet", "warning")
    if args.action in ON_THEIR_OWN:
        return ON_THEIR_OWN[args.action](args)
    try:
        cfg = config.load(args.config)
    except FleetError as exc:
        return daemon.fatal("error", exc)
    logs.REDACTOR.add(*cfg.secrets())
    return WITH_CONFIG[args.action](cfg, args)
