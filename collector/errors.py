"""Exceptions and process exit codes of powa-fleet: the one table of both.

Only the ``main()`` functions turn these into exit codes (through
``collector.daemon.fatal``).  One code means one thing in every program:

====  =====================  ==================================================
code  name                   meaning
====  =====================  ==================================================
0     EXIT_OK                done (a daemon stopped on request)
1     EXIT_FAILURE           a one-shot run failed, a check found problems, an
                             operator command got a negative answer
2     EXIT_CONFIG            bad command line or configuration file
3     EXIT_UNKNOWN_SERVER    the server id is not a remote server of powa_servers
4     EXIT_SERVER_DISABLED   the server's frequency is -1 (not collected)
5     EXIT_UNAVAILABLE       what had to be asked (repository, Redis,
                             supervisord, the control) did not answer
====  =====================  ==================================================

The codes are part of the supervisord contract: the generated program files
list ``EXPECTED_EXIT_CODES`` in ``exitcodes`` so that supervisord does not
restart a worker that can never succeed (no crash loop), while any other exit
is restarted.
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
#: the repository, Redis, supervisord or the control could not be asked
EXIT_UNAVAILABLE = 5

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


class UsageError(FleetError):
    """The command line asks for something that cannot be (a server not in the fleet)."""

    exit_code = EXIT_CONFIG


class UnknownServerError(FleetError):
    """The requested server id is not a remote server of ``powa_servers``."""

    exit_code = EXIT_UNKNOWN_SERVER


class ServerDisabledError(FleetError):
    """The server is registered but its frequency is -1 (not collected)."""

    exit_code = EXIT_SERVER_DISABLED


class RepositoryUnavailable(FleetError):
    """The repository database cannot be reached or queried."""

    exit_code = EXIT_UNAVAILABLE


class RemoteUnavailable(FleetError):
    """The remote server cannot be reached."""

    exit_code = EXIT_UNAVAILABLE


class ConcurrentSnapshotError(FleetError):
    """Another snapshot of the same server holds its ``powa_snapshot_metas`` row."""


class SupervisorError(FleetError):
    """supervisord cannot be reached or refused an operation."""

    exit_code = EXIT_UNAVAILABLE


class SnapshotAborted(FleetError):
    """The snapshot could not be stored at all; the message says why."""


class LeaseHeldError(SnapshotAborted):
    """Another collector host holds the server's lease (collector.hosts): not ours to take."""

    def __init__(self, srvid: int, holder: str) -> None:
        super().__init__(f"server {srvid} is collected by host {holder} (it holds its lease)")
        self.holder = holder


class SnapshotTooSoon(SnapshotAborted):
    """The server's last snapshot, by whoever took it, is younger than half its period."""

    def __init__(self, message: str, age: float) -> None:
        super().__init__(message)
        #: seconds since that snapshot, by the repository's clock
        self.age = age


class ProtocolError(FleetError):
    """A NOTIFY request that cannot be served; the message is the answer's data."""
