"""``powa-fleet check``: everything a fleet needs, checked before anything starts.

One line per item, with a verdict (``ok``, ``warning``, ``FAIL``) and, when
something is wrong, what to do:

* the configuration (every problem at once), its file mode, the fleet directory;
* the repository: reachable, PoWA and its version, the rights the fleet needs;
* Redis: reachable, and protected (a password, or loopback only);
* the supervisord web UI address: free, or served by this fleet's supervisord;
* another collector serving the repository (upstream powa-collector's
  session, ``PoWA collector - main thread (...)``, or another fleet's control);
* every collected remote server: reachable with its row's settings, the
  same PoWA major.minor as the repository, the extensions of its enabled
  sources installed.

Exit status: 0 all is well (warnings allowed), 1 something fails, 2 the
configuration is invalid (nothing else is checked then).  ``--json`` prints
``{"ok": ..., "config": ..., "checks": [{"verdict", "item", "message",
"hint"}, ...]}`` instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import simplejson as json

from collector import config, logs
from collector.cli import check_local, check_remotes, check_repository
from collector.cli.findings import FAIL, WARNING, Finding
from collector.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError


def findings(cfg: config.Config) -> list[Finding]:
    """Every check of a valid configuration, in the order an operator fixes them."""
    found = check_local.config_file(cfg)
    found.append(check_local.fleet_directory(cfg))
    fleet = check_local.our_fleet(cfg)
    timeout = min(cfg.repository.connect_timeout, check_remotes.CONNECT_TIMEOUT)
    repository, view = check_repository.check(cfg, fleet.control_running, timeout)
    found += repository
    found += check_local.redis_server(cfg)
    found.append(check_local.web_ui(cfg, fleet))
    if view is not None:
        found += check_remotes.check(view, cfg.collector.connect_timeout)
    return found


def report(found: Sequence[Finding], path: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": not any(f.verdict == FAIL for f in found), "config": path,
                          "checks": [f.as_dict() for f in found]}, indent=2))
        return
    for finding in found:
        print(finding.line())
    failed = sum(f.verdict == FAIL for f in found)
    warned = sum(f.verdict == WARNING for f in found)
    print(f"check: {failed} failed, {warned} warning(s), {len(found) - failed - warned} ok")


def check(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        report([Finding(FAIL, "config", logs.REDACTOR.redact(problem),
                        "fix collector.cfg (see README, Configure)")
                for problem in exc.problems], str(args.config or ""), args.json)
        return EXIT_CONFIG
    logs.REDACTOR.add(*cfg.secrets())
    found = findings(cfg)
    report(found, str(cfg.path), args.json)
    return EXIT_FAILURE if any(f.verdict == FAIL for f in found) else EXIT_OK
