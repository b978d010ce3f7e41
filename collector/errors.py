"""Exceptions and process exit codes of powa-fleet.

Only the ``main()`` functions turn these into exit codes.  The codes are part
of the supervisord contract: the generated program files list ``EXIT_OK``,
``EXIT_CONFIG``, ``EXIT_UNKNOWN_SERVER`` and ``EXIT_SERVER_DISABLED`` in
``exitcodes`` so that supervisord does not restart a worker that can never
succeed (no crash loop), while any other exit is restarted.
"""

from __future__ import annotations

EXIT_OK = 0
#: a one-shot run failed (``--once``), or an unexpected error
EXIT_FAILURE = 1
#: bad command line or configuration file: fix it, restarting will not help
EXIT_CONFIG = 2
#: the server id is not in ``powa_servers`` (or is the repository itself)
EXIT_UNKNOWN_SERVER = 3
#: the server exists but is not collected (``frequency = -1``)
EXIT_SERVER_DISABLED = 4

#: exit codes supervisord must treat as expected (do not restart)
EXPECTED_EXIT_CODES = (EXIT_OK, EXIT_CONFIG, EXIT_UNKNOWN_SERVER, EXIT_SERVER_DISABLED)


class FleetError(Exception):
    """Root of every error powa-fleet raises on purpose."""

    exit_code = EXIT_FAILURE


class ConfigError(FleetError):
    """The configuration file is missing or invalid.

    ``problems`` holds one line per problem, each naming file, section and key.
    """

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class UnknownServerError(FleetError):
    """The requested server id is not a remote server of ``powa_servers``."""

    exit_code = EXIT_UNKNOWN_SERVER


class ServerDisabledError(FleetError):
    """The server is registered but its frequency is -1 (not collected)."""

    exit_code = EXIT_SERVER_DISABLED


class RepositoryUnavailable(FleetError):
    """The repository database cannot be reached or queried."""


class RemoteUnavailable(FleetError):
    """The remote server cannot be reached."""


class ConcurrentSnapshotError(FleetError):
    """Another snapshot of the same server holds its ``powa_snapshot_metas`` row."""


class SupervisorError(FleetError):
    """supervisord cannot be reached or refused an operation."""
