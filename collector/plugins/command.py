"""Command plugin: run a program for worker events, with the event as JSON on stdin.

    [plugin:command]
    command = /usr/local/bin/powa-alert --channel dba
    timeout = 10
    events = status_changed snapshot_failed

``command`` is split like a shell would (``shlex``) but never run through a
shell, and never formatted with event values: the event, an untrusted text
(aliases, error messages), only reaches the program on its stdin, one JSON
object and a newline.  The executable must be an absolute path or a name
found in ``PATH``; it is checked at start.  A program still running after
``timeout`` seconds is killed with its whole process group.  A non-zero exit
or a timeout is logged with the end of the program's stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import simplejson as json

from collector.plugins import HOOKS, Event, Plugin, number

log = logging.getLogger(__name__)

DEFAULT_EVENTS = ("status_changed", "snapshot_failed")
#: bytes of stderr kept for the log: enough to see an error, bounded whatever the program writes
TAIL_BYTES = 2000


class Command(Plugin):
    """Runs one program per chosen event (see the module's docstring)."""

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        self.argv: list[str] = self.setting("command", [], command_argv, required=True)
        self.run_timeout = self.setting("timeout", 10.0, number(0.1, 3600))
        self.kinds: tuple[str, ...] = self.setting("events", DEFAULT_EVENTS, event_kinds)
        # the hook itself waits for the program, then for the kill
        self.timeout = self.run_timeout + 10

    def snapshot_done(self, event: Event) -> None:
        self._maybe_run("snapshot_done", event)

    def snapshot_failed(self, event: Event) -> None:
        self._maybe_run("snapshot_failed", event)

    def status_changed(self, event: Event) -> None:
        self._maybe_run("status_changed", event)

    def _maybe_run(self, kind: str, event: Event) -> None:
        if kind in self.kinds:
            self.run(kind, (json.dumps(event) + "\n").encode())

    def run(self, kind: str, data: bytes) -> int | None:
        """Run the program once; its exit status, None when it had to be killed."""
        program = Path(self.argv[0]).name
        try:
            process = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as exc:
            log.error("plugin %s: cannot run %s for %s: %s", self.name, program, kind, exc)
            return None
        assert process.stdin is not None and process.stderr is not None
        tail = StderrTail(process.stderr)
        tail.start()
        threading.Thread(target=_feed, args=(process.stdin, data), daemon=True).start()
        try:
            code: int | None = process.wait(self.run_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            code = None
        # a background child may keep stderr open: do not wait for it
        tail.finish(2.0)
        self._report(program, kind, code, tail.text())
        return code

    def _report(self, program: str, kind: str, code: int | None, stderr: str) -> None:
        if code == 0:
            log.debug("plugin %s: %s done for %s", self.name, program, kind)
        elif code is None:
            log.error("plugin %s: %s still running after %gs for %s, killed; stderr: %r",
                      self.name, program, self.run_timeout, kind, stderr)
        elif code < 0:
            log.error("plugin %s: %s killed by signal %d for %s; stderr: %r",
                      self.name, program, -code, kind, stderr)
        else:
            log.error("plugin %s: %s exited with status %d for %s; stderr: %r",
                      self.name, program, code, kind, stderr)


class StderrTail(threading.Thread):
    """Reads a program's stderr to the end, keeping only its last bytes.

    A background child of the program may hold stderr open long after the
    program itself exited: ``finish`` makes the thread give up then, and it
    closes the pipe itself (closing it from another thread would not wake a
    blocked read), so neither the thread nor the descriptor outlives the event.
    """

    def __init__(self, stream: IO[bytes], limit: int = TAIL_BYTES) -> None:
        super().__init__(name="command-stderr", daemon=True)
        self.stream = stream
        self.limit = limit
        self._tail = b""
        self._finish = threading.Event()

    def run(self) -> None:
        fd = self.stream.fileno()
        with self.stream:
            while not self._finish.is_set():
                readable, _, _ = select.select([fd], [], [], 0.1)
                if not readable:
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    return
                self._tail = (self._tail + chunk)[-self.limit:]

    def finish(self, within: float) -> None:
        """Read what comes within ``within`` seconds more, then stop and close the pipe."""
        self.join(within)
        self._finish.set()
        self.join()

    def text(self) -> str:
        return self._tail.decode(errors="replace").strip()


def _feed(stdin: IO[bytes], data: bytes) -> None:
    # a program that does not read its stdin (or exits early) is not an error
    with contextlib.suppress(OSError):
        stdin.write(data)
    with contextlib.suppress(OSError):
        stdin.close()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # start_new_session made the program the leader of its own group: its children go too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def command_argv(raw: str) -> list[str]:
    """The argv of ``command``, its executable resolved to an absolute path."""
    argv = shlex.split(raw)
    if not argv:
        raise ValueError("missing value")
    executable = argv[0]
    if "/" in executable:
        path = Path(executable)
        if not path.is_absolute():
            raise ValueError(f"{executable!r}: use an absolute path or a name found in PATH")
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ValueError(f"{executable!r} is not an executable file")
        return argv
    found = shutil.which(executable)
    if found is None:
        raise ValueError(f"{executable!r} not found in PATH")
    return [found, *argv[1:]]


def event_kinds(raw: str) -> tuple[str, ...]:
    kinds = tuple(raw.replace(",", " ").split())
    unknown = [k for k in kinds if k not in HOOKS]
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r}, expected some of: {', '.join(HOOKS)}")
    return kinds
