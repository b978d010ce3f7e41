"""The worker's first step: ask the fleet's spawner for a worker, and stand for it.

supervisord runs ``python -m collector.worker -c CFG --srvid N`` for each
server.  Importing psycopg 3, redis-py and the package costs a worker about
0.3 s of CPU and most of its memory; 800 workers importing them on a 2-core
host take minutes, each with its own copy.  So the fleet runs one more
program, the spawner (``collector.worker.spawner``), which imports all that
once and forks a worker per request: a fork costs milliseconds, and the
imported pages stay shared, copy-on-write, between the spawner and every
worker.

This module is that request, and it must stay light (the standard library's
``os``, ``signal``, ``socket``, ``struct`` only): the process supervisord
started stays in place for the whole life of the worker, as its stand-in.

* It connects to ``<fleet directory>/.spawner.sock`` and sends its command
  line, working directory and environment, with its stdin, stdout and stderr
  (``SCM_RIGHTS``): the worker logs where supervisord reads.  The spawner
  answers with the worker's pid; the worker knows this process's pid as its
  program's (``POWA_FLEET_PROGRAM_PID``, the pid supervisord shows), which it
  publishes in its status.
* Signals sent to this process are relayed: SIGTERM, SIGINT and SIGQUIT to
  the worker's process group (``stopasgroup`` reaches plugin commands as it
  did), SIGHUP, SIGUSR1 and SIGUSR2 to the worker itself.
* When the worker ends, it sends its exit code and this process exits with
  it, so supervisord's ``exitcodes`` keep their meaning.  A worker that dies
  without sending one (killed) makes this process exit with 1 (restarted).
* When this process dies (supervisord's SIGKILL after ``stopwaitsecs``), the
  worker sees its end of the connection close and kills its process group.

Without a spawner (none configured, none listening, an old fleet), the
caller imports the worker here as before.  A supervised worker of a fleet
that has a spawner (``POWA_FLEET_SPAWNER=1`` in its environment) waits up
to ``WAIT`` seconds for it first: at supervisord's start every program starts
at once, and the spawner needs a moment to import.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from collector.spawning import ENV_SPAWNER, EXIT, FRAME, PID, be_nice, encode_request, socket_path

#: longest wait for the spawner to listen, for a supervised worker of a fleet that has one:
#: at supervisord's start the spawner imports while hundreds of programs start (800 on
#: two cores: 15 s was not enough, and a worker that gives up imports on its own)
WAIT = 60.0
#: longest pause between two tries to reach the spawner
MAX_RETRY = 1.0
#: longest wait for the spawner's answer (the worker's pid) once connected
ANSWER_WAIT = 30.0
#: signals relayed to the worker's process group, and to the worker alone
TO_GROUP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
TO_WORKER = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
#: exit status of a worker that ended without saying (killed): not an expected code
EXIT_UNKNOWN = 1


class Relay:
    """Signals to this process, passed on to the worker once its pid is known."""

    def __init__(self) -> None:
        self.pid = 0
        self.pending: list[int] = []
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in (*TO_GROUP, *TO_WORKER):
            self.previous[signum] = signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self.previous.clear()

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        if self.pid:
            self.send(signum)
        else:
            self.pending.append(signum)

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            self.send(signum)
        self.pending.clear()

    def send(self, signum: int) -> None:
        try:
            if signum in TO_GROUP:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


def _connect(path: str, wait: float) -> socket.socket | None:
    """A connection to the spawner, tried until ``wait`` seconds have passed.

    The tries back off from 0.1 to 1 s, spread by pid: at supervisord's start
    hundreds of stand-ins wait together, and polling every few milliseconds
    they would take the CPU the spawner needs to import (measured: 800 of them
    at 20 tries a second held both cores of the benchmark host).
    """
    deadline = time.monotonic() + wait
    delay = 0.1 * (0.5 + os.getpid() % 100 / 100)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(delay, left))
            delay = min(delay * 2, MAX_RETRY)


def _read_frame(sock: socket.socket) -> tuple[bytes, int] | None:
    data = b""
    while len(data) < FRAME.size:
        chunk = sock.recv(FRAME.size - len(data))
        if not chunk:
            return None
        data += chunk
    kind, value = FRAME.unpack(data)
    return kind, value


def forked(argv: Sequence[str], environ: Mapping[str, str], config: str | None) -> int | None:
    """Have the spawner run this worker; its exit code, or None when there is no spawner.

    None also when the spawner closed the connection before starting a
    worker: the caller then runs the worker itself.
    """
    path = socket_path(config)
    if path is None:
        return None
    supervised = bool(environ.get("SUPERVISOR_ENABLED"))
    if supervised:
        # hundreds start together: supervisord, the spawner and the control come first
        be_nice()
    wait = WAIT if supervised and environ.get(ENV_SPAWNER) == "1" else 0.0
    sock = _connect(path, wait)
    if sock is None:
        return None
    relay = Relay()
    relay.install()
    try:
        with sock:
            return _stand_in(sock, relay, argv, environ)
    finally:
        relay.uninstall()


def _stand_in(sock: socket.socket, relay: Relay, argv: Sequence[str],
              environ: Mapping[str, str]) -> int | None:
    try:
        sock.settimeout(ANSWER_WAIT)
        request = encode_request(os.getcwd(), argv, environ)  # noqa: PTH109
        socket.send_fds(sock, [request], [0, 1, 2])
        answer = _read_frame(sock)
    except OSError:
        answer = None
    if answer is None or answer[0] != PID:
        # no worker was started: unless asked to stop meanwhile, the caller runs it
        return 0 if any(signum in TO_GROUP for signum in relay.pending) else None
    relay.started(answer[1])
    sock.settimeout(None)
    try:
        end = _read_frame(sock)
    except OSError:
        end = None
    if end is None or end[0] != EXIT:
        print(f"worker process {answer[1]} ended without an exit status (killed?)",
              file=sys.stderr)
        return EXIT_UNKNOWN
    return end[1]
