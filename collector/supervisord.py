"""Talking to the fleet's supervisord over its XML-RPC API (unix socket).

``apply()`` does what ``supervisorctl update`` does: re-read the
configuration, then add new groups, stop and remove deleted ones, and
restart changed ones, leaving every other program untouched.
"""

from __future__ import annotations

import http.client
import logging
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

from collector.errors import SupervisorError
from collector.logs import one_line

log = logging.getLogger(__name__)

# unix socket paths are limited to 108 bytes by the kernel
MAX_SOCKET_PATH = 107


@dataclass
class ApplyReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return (
            [f"{name}: started" for name in self.added]
            + [f"{name}: restarted (program changed)" for name in self.changed]
            + [f"{name}: stopped and removed" for name in self.removed]
        )


class Supervisor:
    """A client of one supervisord, through the unix socket of the fleet."""

    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise SupervisorError(
                f"socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes:"
                " use a shorter fleet directory"
            )
        self.socket_path = socket_path
        transport = SupervisorTransport(None, None, f"unix://{socket_path}")
        transport.timeout = timeout
        self.proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _call(self, method: str, *args: Any, tolerate: tuple[str, ...] = ()) -> Any:
        """Call ``supervisor.<method>``; None for a fault whose code is in ``tolerate``."""
        try:
            return getattr(self.proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as fault:
            if any(code in fault.faultString for code in tolerate):
                return None
            raise SupervisorError(f"supervisord refused {method}: {fault.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorError(
                f"cannot reach supervisord at {self.socket_path}: {one_line(exc)}"
            ) from None

    def state(self) -> str:
        return str(self._call("getState")["statename"])

    def all_processes(self) -> dict[str, dict[str, Any]]:
        """Process info of every program, by name."""
        infos = cast(list[dict[str, Any]], self._call("getAllProcessInfo"))
        return {info["name"]: info for info in infos}

    def process(self, name: str) -> dict[str, Any] | None:
        """Process info of one program, None if supervisord does not know it."""
        info = self._call("getProcessInfo", name, tolerate=("BAD_NAME",))
        return cast(dict[str, Any] | None, info)

    def signal(self, name: str, signame: str) -> bool:
        """Send a signal to a running program; False when it is not running."""
        sent = self._call("signalProcess", name, signame, tolerate=("NOT_RUNNING", "BAD_NAME"))
        return bool(sent)

    def apply(self, keep: str | None = None) -> ApplyReport:
        """``supervisorctl update``: make the running programs match the configuration files.

        ``keep`` names a program not to restart even if its settings changed (the
        caller itself); it takes them at its next restart.
        """
        added, changed, removed = self._call("reloadConfig")[0]
        if keep in changed:
            log.warning("%s: new settings, taken at its next restart", keep)
            changed = [name for name in changed if name != keep]
        report = ApplyReport(sorted(added), sorted(changed), sorted(removed))
        for name in report.removed + report.changed:
            # already stopped or gone: nothing to stop
            self._call("stopProcessGroup", name, tolerate=("NOT_RUNNING", "BAD_NAME"))
            self._call("removeProcessGroup", name)
        for name in report.changed + report.added:
            self._call("addProcessGroup", name)
        for line in report.lines():
            log.info("supervisord: %s", line)
        return report
