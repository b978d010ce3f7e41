"""The fleet's spawner: one process imports the worker once and forks every worker.

    python -OO -m collector.worker.spawner -c CFG      (run by supervisord as [program:spawner])

A worker's libraries (psycopg 3, redis-py, the package) cost 0.3 s of CPU to
import and most of its memory.  The spawner imports them once, freezes what
it built (``gc.freeze``: a worker's collections never walk, so never copy,
the inherited objects), and listens on ``<fleet directory>/.spawner.sock``.
Each worker program's process (``collector.worker.stub``) connects and sends
its command line, working directory, environment and standard streams; the
spawner forks, and the child becomes that worker: it takes the streams (its
logs go where supervisord reads), the environment and directory, its own
process group, answers its pid, and runs ``collector.worker.loop.main``
with the command line, as ``python -m collector.worker`` would.  It sends
its exit code to the stub at the end, and kills its process group if the stub
goes away first.

The spawner does nothing else: it reads no configuration beyond its logging,
keeps no state about the workers (the kernel reaps them: SIGCHLD is ignored),
and its own end leaves running workers alone (they are in their own process
groups, and the stubs hold them).  Only processes of the same user may ask
(``SO_PEERCRED``, and the socket is 0600 in the fleet directory, 0700).  A
fork runs nothing before the request is read in the child: a client that
connects and says nothing costs one idle child for ``REQUEST_WAIT`` seconds,
never the spawner's time.

After an upgrade of the package, ``supervisorctl restart spawner``: the
workers forked later run the new code (``restart all`` does it for all).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from collector import config, daemon, spawning
from collector.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from collector.worker import loop, startgate

log = logging.getLogger(__name__)

#: seconds a forked child waits for the request it was forked for
REQUEST_WAIT = 10.0
#: pause after a failed accept or fork (out of descriptors or processes)
ERROR_PAUSE = 0.1
#: the largest request (command line and environment) a child reads
MAX_REQUEST = 1 << 20
#: what a worker imports only when it first connects or snapshots: imported here,
#: so that it is shared too (measured: what sys.modules gains after a snapshot)
LATER_IMPORTS = (
    "psycopg.pq._pq_ctypes", "psycopg_binary.pq", "psycopg_binary._psycopg",
    "psycopg.types.array", "psycopg.types.datetime", "psycopg.types.json",
    "psycopg.types.numeric", "psycopg.types.string", "psycopg.types.bool",
    "psycopg.types.none", "psycopg.types.uuid", "psycopg.types.range",
    "psycopg.types.multirange", "psycopg.types.net", "psycopg.types.hstore",
    "psycopg.types.composite", "psycopg.types.enum", "psycopg.types.numpy",
    "psycopg.types.shapely", "psycopg.dbapi20", "psycopg.raw_cursor",
    "redis.connection", "redis.retry", "redis.backoff", "redis._parsers",
    "ssl", "tempfile", "uuid", "decimal", "ipaddress", "zoneinfo",
)
_PEERCRED = struct.Struct("3i")


def preload() -> list[str]:
    """Import what workers import late; the names that could not be imported."""
    missing = []
    for name in LATER_IMPORTS:
        try:
            __import__(name)
        except Exception:  # an optional part absent from this install: the worker does without
            missing.append(name)
    return missing


class _Stop(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


class Spawner:
    """The listening socket and the accept loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen(self) -> None:
        """Bind the socket, replacing a stale one; refuse when another spawner answers on it."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe, contextlib.suppress(OSError):
            probe.connect(self.path)
            raise RuntimeError(f"another spawner listens on {self.path}")
        Path(self.path).unlink(missing_ok=True)
        previous = os.umask(0o177)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(previous)
        self.listener.listen(socket.SOMAXCONN)

    def serve(self) -> None:
        """Fork a child per accepted connection of this user, until SIGTERM or SIGINT."""
        uid = os.getuid()
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                # out of descriptors, a client gone before accept: never a crash loop
                log.warning("cannot accept a spawn request: %s", exc)
                time.sleep(ERROR_PAUSE)
                continue
            with conn:
                try:
                    self._serve_one(conn, uid)
                except OSError as exc:
                    # out of processes or memory: the stand-in runs its worker itself
                    log.warning("spawn request not served: %s", exc)
                    time.sleep(ERROR_PAUSE)

    def _serve_one(self, conn: socket.socket, uid: int) -> None:
        pid, peer_uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if peer_uid != uid:
            log.warning("request from pid %d of uid %d refused (not this fleet's user)",
                        pid, peer_uid)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            child(conn, self.listener, pid)  # never returns

    def close(self) -> None:
        self.listener.close()
        with contextlib.suppress(OSError):
            Path(self.path).unlink(missing_ok=True)


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    header = spawning.LENGTH.size
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    while len(data) < header or len(data) < header + spawning.LENGTH.unpack(data[:header])[0]:
        if len(data) > MAX_REQUEST:
            raise ValueError("spawn request too large")
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("spawn request cut short")
        data += chunk
    return data[header:], fds


def child(conn: socket.socket, listener: socket.socket, program_pid: int) -> None:
    """Become the worker a stub asked for; exits, never returns."""
    code = EXIT_FAILURE
    try:
        listener.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.setpgid(0, 0)
        argv = _become(conn, program_pid)
    except Exception as exc:
        # nothing started: the stub sees the connection close and runs the worker itself
        log.error("spawn request from pid %d not served: %s", program_pid, exc)
        os._exit(EXIT_FAILURE)
    ending = threading.Event()
    threading.Thread(target=_watch_stub, args=(conn, ending), name="stub", daemon=True).start()
    try:
        code = _run(argv)
    finally:
        ending.set()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.sendall(spawning.FRAME.pack(spawning.EXIT, code))
        os._exit(code)


def _become(conn: socket.socket, program_pid: int) -> list[str]:
    """Take the stub's streams, directory and environment; the worker's arguments."""
    conn.settimeout(REQUEST_WAIT)
    request, fds = _receive(conn)
    try:
        if len(fds) != 3:
            raise ValueError(f"expected 3 standard streams, got {len(fds)}")
        cwd, argv, environ = spawning.decode_request(request)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
    finally:
        for fd in fds:
            os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    os.environ[spawning.ENV_PROGRAM_PID] = str(program_pid)
    with contextlib.suppress(OSError), Path("/proc/self/comm").open("w") as comm:
        comm.write(f"worker_{startgate.server_id(argv)}")
    daemon.STARTED = time.monotonic()
    supervised = bool(environ.get("SUPERVISOR_ENABLED")) and "--once" not in argv
    startgate.be_nice(Path(cwd) if supervised else None)
    conn.settimeout(None)
    conn.sendall(spawning.FRAME.pack(spawning.PID, os.getpid()))
    return argv


def _watch_stub(conn: socket.socket, ending: threading.Event) -> None:
    """The stub never writes after its request: end of input means it is gone."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    if not ending.is_set():
        os.killpg(0, signal.SIGKILL)


def _run(argv: list[str]) -> int:
    sys.argv = ["collector.worker", *argv]
    try:
        return loop.main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        print(exc.code, file=sys.stderr)
        return EXIT_FAILURE
    except Exception:
        log.exception("worker failed")
        return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.worker.spawner",
                                     description="fork server of a powa-fleet's workers")
    daemon.config_argument(parser)
    args = parser.parse_args(argv)
    cfg: config.Config = daemon.load_config("spawner", args.config)
    missing = preload()
    gc.collect()
    gc.freeze()
    spawner = Spawner(str(cfg.directory / spawning.SOCKET_NAME))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        spawner.listen()
    except (OSError, RuntimeError) as exc:
        return daemon.fatal("spawner", f"cannot listen: {exc}", EXIT_UNAVAILABLE)
    log.info("forking workers on %s (ready after %.2f s of CPU%s)", spawner.path,
             time.process_time(),
             f"; not installed: {', '.join(missing)}" if missing else "")
    try:
        spawner.serve()
    except _Stop:
        log.info("stopped")
    finally:
        spawner.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
