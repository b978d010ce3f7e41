"""Talking to the fleet's supervisord over its XML-RPC API (unix socket).

``apply()`` does what ``supervisorctl update`` does: re-read the
configuration, then add new groups, stop and remove deleted ones, and
restart changed ones, leaving every other program untouched.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from supervisor.states import STOPPED_STATES

from collector.errors import SupervisorError
from collector.logs import one_line

log = logging.getLogger(__name__)

# unix socket paths are limited to 108 bytes by the kernel
MAX_SOCKET_PATH = 107
#: longest wait for stopped programs: above the largest stopwaitsecs (stop_grace 600 + margin)
STOP_WAIT = 660.0


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


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the fleet's unix socket, every read and write bounded by ``timeout``."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """The standard transport (it drops a connection that failed) over a unix socket.

    supervisor's own SupervisorTransport ignores any timeout, so a hung
    supervisord would freeze its caller for good, and it keeps a connection
    that failed half-way, so every later call fails too.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        host_, cached = self._connection
        if cached is not None and host_ == host:
            return cached
        connection = _UnixConnection(self.path, self.timeout)
        self._connection = host, connection
        return connection


class Supervisor:
    """A client of one supervisord, through the unix socket of the fleet."""

    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise SupervisorError(
                f"socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes:"
                " use a shorter fleet directory"
            )
        self.socket_path = socket_path
        self.proxy = xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=_UnixTransport(socket_path, timeout)
        )

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

    def multicall(self, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Several ``supervisor.<method>`` calls in one request, in order.

        Each result is the call's value (supervisord does not wrap it in a
        one-item array), or a ``{"faultCode", "faultString"}`` dict for a call
        it refused (the others still happen).
        """
        if not calls:
            return []
        request = [{"methodName": f"supervisor.{method}", "params": list(params)}
                   for method, params in calls]
        try:
            results = self.proxy.system.multicall(request)
        except xmlrpc.client.Fault as fault:
            raise SupervisorError(f"supervisord refused a multicall: {fault.faultString}") from None
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorError(
                f"cannot reach supervisord at {self.socket_path}: {one_line(exc)}"
            ) from None
        return cast(list[Any], results)

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

    def start(self, name: str) -> bool:
        """Start a program without waiting; False when it runs already or is unknown."""
        started = self._call("startProcess", name, False,
                             tolerate=("ALREADY_STARTED", "BAD_NAME"))
        return bool(started)

    def signal(self, name: str, signame: str) -> bool:
        """Send a signal to a running program; False when it is not running."""
        sent = self._call("signalProcess", name, signame, tolerate=("NOT_RUNNING", "BAD_NAME"))
        return bool(sent)

    def _stop_groups(self, names: list[str], cancel: threading.Event | None = None) -> None:
        """Stop these groups all at once and wait until none of their processes runs.

        One at a time, each stop would wait for its worker's snapshot to end:
        a reload that changes every program would take minutes.  supervisord
        kills what outlives its ``stopwaitsecs``; ``STOP_WAIT`` bounds the wait,
        and ``cancel`` ends it early (the caller is stopping: supervisord goes
        on stopping them by itself).
        """
        if not names:
            return
        for name in names:
            # already stopped or gone: nothing to stop
            self._call("stopProcessGroup", name, False, tolerate=("NOT_RUNNING", "BAD_NAME"))
        groups = set(names)
        deadline = time.monotonic() + STOP_WAIT
        cancel = cancel or threading.Event()
        # a whole-table read costs supervisord ~0.2 s at 500 programs: look
        # often for a quick stop, then less often while snapshots wind down
        delay = 0.1
        while True:
            running = sorted(info["name"] for info in self.all_processes().values()
                             if info["group"] in groups and info["state"] not in STOPPED_STATES)
            if not running:
                return
            if time.monotonic() > deadline:
                raise SupervisorError(f"still running after {STOP_WAIT:.0f}s: "
                                      f"{', '.join(running[:10])}")
            if cancel.wait(delay):
                raise SupervisorError("cancelled while waiting for programs to stop: "
                                      f"{', '.join(running[:10])}")
            delay = min(delay * 2, 1.0)

    def plan(self, keep: str | None = None) -> ApplyReport:
        """Re-read the configuration files: what an ``execute()`` would change.

        ``keep`` names a program not to restart even if its settings changed (the
        caller itself); it takes them at its next restart.
        """
        added, changed, removed = self._call("reloadConfig")[0]
        if keep in changed:
            log.warning("%s: new settings, taken at its next restart", keep)
            changed = [name for name in changed if name != keep]
        return ApplyReport(sorted(added), sorted(changed), sorted(removed))

    def execute(self, report: ApplyReport, cancel: threading.Event | None = None) -> None:
        """Stop and remove deleted groups, restart changed ones, add new ones."""
        self._stop_groups(report.removed + report.changed, cancel)
        for name in report.removed + report.changed:
            self._call("removeProcessGroup", name, tolerate=("BAD_NAME",))
        for name in report.changed + report.added:
            self._call("addProcessGroup", name, tolerate=("ALREADY_ADDED",))
        for line in report.lines():
            log.info("supervisord: %s", line)

    def apply(self, keep: str | None = None) -> ApplyReport:
        """``supervisorctl update``: make the running programs match the configuration files."""
        report = self.plan(keep)
        self.execute(report)
        return report
