"""create_supervisord_config.py: turn powa_servers into the fleet's supervisord files.

    python create_supervisord_config.py [-c CFG] [--apply] [--enable N | --disable N]
    powa-fleet generate [-c CFG] [--apply] [--enable N | --disable N]     (the same code)

Reads the collected servers (id > 0, frequency > 0) from the repository and
writes, beside the configuration file, one program file per server in
``workers_available/``, the symlinks of ``workers_enabled/`` and
``supervisord.conf`` (see collector.fleet).  ``--apply`` then makes a running
supervisord match, like ``supervisorctl update``.  ``--enable N`` and
``--disable N`` only manage one symlink (no repository needed) and apply it
when supervisord runs.

Exit status (collector.errors): 0 done; 2 bad configuration; 5 the
repository or supervisord could not be asked (with ``--apply``, the files
are written then); 1 the fleet files could not be written.
"""

from __future__ import annotations

import argparse
import contextlib

import psycopg

from collector import config, daemon, hosts, logs, repository
from collector.errors import EXIT_OK, FleetError, RepositoryUnavailable, SupervisorError
from collector.fleet import bytecode, files
from collector.fleet.supervisord import Supervisor
from collector.keys import client, program_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's options (all but -c), for this script and ``powa-fleet generate``."""
    parser.add_argument("--apply", action="store_true",
                        help="apply the result to the running supervisord (like supervisorctl "
                             "update)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--enable", type=int, metavar="N", help="enable worker_N and apply")
    group.add_argument("--disable", type=int, metavar="N", help="disable worker_N and apply")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="create_supervisord_config.py",
        description="Generate the supervisord programs of a powa-fleet from powa_servers.",
    )
    daemon.config_argument(parser)
    add_arguments(parser)
    return parser.parse_args(argv)


def collected_servers(cfg: config.Config) -> list[int]:
    """Ids of the servers to collect; FleetError (one line) if the repository cannot tell."""
    try:
        with repository.session(cfg.repository.dsn, "generator",
                                cfg.repository.connect_timeout) as conn:
            powa = repository.require_powa(conn)
            return [server.srvid for server in repository.list_servers(conn, powa)]
    except psycopg.Error as exc:
        raise RepositoryUnavailable(f"cannot read powa_servers: {logs.one_line(exc)}") from None


def share(cfg: config.Config, servers: list[int]) -> list[int]:
    """The servers this host collects among the live hosts of the fleet (collector.hosts)."""
    with contextlib.closing(client(cfg.redis.url)) as connection:
        view, source = hosts.current_view(cfg, connection)
    mine = hosts.owned(servers, view, cfg.fleet.host)
    if len(view) > 1 or not source.startswith("Redis"):
        print(f"host {cfg.fleet.host}: {len(mine)} of {len(servers)} servers"
              f" (live hosts: {', '.join(view)}; from {source})")
    return mine


def apply(cfg: config.Config, required: bool) -> int:
    """Apply the files to supervisord; when not ``required``, a stopped supervisord is fine."""
    if not required and not cfg.supervisor_socket.exists():
        print(f"supervisord is not running ({cfg.supervisor_socket} missing): "
              "the change takes effect when it starts")
        return EXIT_OK
    try:
        report = Supervisor(cfg.supervisor_socket).apply()
    except SupervisorError as exc:
        return daemon.fatal("error", f"files written, but applying them failed: {exc}",
                            exc.exit_code)
    for line in report.lines() or ["supervisord: nothing to change"]:
        print(line)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Generate (or toggle one server) as ``args`` say; FleetError when it cannot."""
    cfg = config.load(args.config)
    logs.REDACTOR.add(*cfg.secrets())
    # what the library modules log goes through the redactor too
    logs.setup("create_supervisord_config", "warning")
    toggle = args.enable if args.enable is not None else args.disable
    if toggle is not None:
        changed = files.set_enabled(cfg, toggle, enable=args.enable is not None)
        state = "enabled" if args.enable is not None else "disabled"
        print(f"{program_name(toggle)}: {state}{'' if changed else ' already'}")
        return apply(cfg, required=args.apply)
    report = files.generate(cfg, share(cfg, collected_servers(cfg)))
    for line in report.lines():
        print(line)
    bytecode.warm_for(cfg, report)
    return apply(cfg, required=True) if args.apply else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except FleetError as exc:
        return daemon.fatal("error", exc)
