"""``powa-fleet migrate``: upstream powa-collector's ``powa-collector.conf`` -> ``collector.cfg``.

Upstream's file is JSON with ``repository.dsn``, ``use_server_alias`` and
``debug`` (powa-collector 1.3.2, ``options.py``), looked for in
``/etc/powa-collector.conf``, ``~/.config/powa-collector.conf``,
``~/.powa-collector.conf`` and ``./powa-collector.conf``, in that order.
The DSN is copied as it is, password included when upstream's file has one,
into a ``collector.cfg`` written with mode 0600; what upstream has no notion
of (Redis, the web UI) gets the defaults or the options given, and the web
UI a random password.  An existing file is never replaced without
``--force``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import simplejson as json
from psycopg.conninfo import conninfo_to_dict

from collector import config
from collector.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, FleetError
from collector.fleet.files import write_atomic

UPSTREAM_LOCATIONS = ("/etc/powa-collector.conf", "~/.config/powa-collector.conf",
                      "~/.powa-collector.conf", "./powa-collector.conf")
UPSTREAM_KEYS = frozenset({"repository", "use_server_alias", "debug"})
TEMPLATE = """\
; powa-fleet configuration, migrated by `powa-fleet migrate` from {source}.
; Every generated file (supervisord.conf, workers_available/, workers_enabled/,
; logs/, the supervisord socket and pid file) is written in this file's directory.
; It holds secrets: keep it mode 0600, owned by the fleet's user.

[repository]
dsn = {dsn}

[redis]
url = {redis_url}
prefix = powa

[supervisor]
; supervisord's web UI and XML-RPC endpoint; empty: none
http = {http}
username = admin
password = {password}

[collector]
use_server_alias = {use_server_alias}
auto_enable = true
log_level = {log_level}

[plugins]
enabled =
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("upstream", nargs="?",
                        help="upstream's powa-collector.conf (default: the first of "
                             + ", ".join(UPSTREAM_LOCATIONS) + ")")
    parser.add_argument("--force", action="store_true", help="replace an existing collector.cfg")
    parser.add_argument("--redis-url", default=config.DEFAULT_REDIS_URL,
                        help="[redis] url to write (default %(default)s)")
    parser.add_argument("--http", default="127.0.0.1:9001",
                        help="[supervisor] http, the web UI address (default %(default)s)")


def upstream_file(given: str | None) -> Path:
    if given:
        return Path(given).expanduser()
    for place in UPSTREAM_LOCATIONS:
        path = Path(place).expanduser()
        if path.is_file():
            return path
    raise FleetError("no upstream configuration found in " + ", ".join(UPSTREAM_LOCATIONS)
                     + ": name it")


def read_upstream(path: Path) -> dict[str, Any]:
    """Upstream's options; FleetError (never quoting the file: it may hold a password)."""
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetError(f"{path}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise FleetError(f"{path}: not valid JSON (line {getattr(exc, 'lineno', '?')})") from None
    dsn = options.get("repository", {}).get("dsn") if isinstance(options, dict) else None
    if not isinstance(dsn, str) or not dsn.strip() or "\n" in dsn or "\r" in dsn:
        raise FleetError(f"{path}: no usable repository.dsn (upstream needs one too)")
    try:
        conninfo_to_dict(dsn)
    except Exception:
        raise FleetError(f"{path}: repository.dsn is not a libpq connection string") from None
    return dict(options)


def render(options: dict[str, Any], source: Path, args: argparse.Namespace) -> str:
    return TEMPLATE.format(
        source=source, dsn=options["repository"]["dsn"].strip(), redis_url=args.redis_url,
        http=args.http, password=secrets.token_urlsafe(18),
        use_server_alias="true" if options.get("use_server_alias") else "false",
        log_level="debug" if options.get("debug") else "info",
    )


def target(args: argparse.Namespace) -> Path:
    """Where to write: -c, else $POWA_FLEET_CONFIG, else ./collector.cfg."""
    given = args.config or os.environ.get(config.CONFIG_ENV) or "collector.cfg"
    return Path(given).expanduser().absolute()


def migrate(args: argparse.Namespace) -> int:
    try:
        source = upstream_file(args.upstream)
        options = read_upstream(source)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    path = target(args)
    if path.exists() and not args.force:
        print(f"error: {path} exists: not replaced (--force replaces it)", file=sys.stderr)
        return EXIT_FAILURE
    ignored = sorted(set(options) - UPSTREAM_KEYS)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render(options, source, args), mode=0o600)
    try:
        config.load(path)
    except FleetError as exc:
        print(f"wrote {path}, but it is not valid yet:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {path} (mode 0600) from {source}")
    if ignored:
        print("ignored upstream keys: " + ", ".join(map(repr, ignored)))
    print("the web UI password is a new random one, in [supervisor] password; next: "
          f"powa-fleet -c {path} check")
    return EXIT_OK
