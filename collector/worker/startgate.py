"""The start gate: workers of one host import their libraries a few at a time.

A worker spends 150-200 ms of CPU importing psycopg, redis-py and the
package before it can do anything.  supervisord starts every program of a
fleet at once (at its own start, and when a RELOAD adds hundreds): 800
interpreters importing together would hold both cores of a small host for a
minute, during which the control answers powa-web late and the repository
competes with them.

So a worker started by supervisord first takes one of N slots (N = the CPUs
it may run on, or ``$POWA_FLEET_START_SLOTS``): an exclusive ``flock`` on
``<fleet directory>/.start/slot_K``, K = server id modulo N.  The kernel
queues the waiters at no cost, releases the slot when the holder exits or
closes it, and nothing else has to run: no coordinator, nothing to clean
up after a crash.  The slot is held during the imports only (the heavy CPU
part), not while connecting (waiting on the network costs no CPU).  A
waiter gives up waiting after ``MAX_WAIT`` seconds and goes on: the gate
paces starts, it never stops one.

This module is imported before anything heavy (it must not import the
package's configuration, which pulls psycopg), so it reads the fleet
directory from the ``-c`` option itself.  Waiting is "running" for
supervisord (``startsecs`` counts it), and SIGTERM still ends a waiter at
once: no handler is installed yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from collector import spawning
from collector.spawning import config_path

#: longest wait for a slot (seconds) before starting anyway
MAX_WAIT = 60
ENV_SLOTS = "POWA_FLEET_START_SLOTS"


def slots() -> int:
    """How many workers import at once: ``$POWA_FLEET_START_SLOTS``, else the usable CPUs."""
    with contextlib.suppress(ValueError):
        wanted = int(os.environ.get(ENV_SLOTS, ""))
        if wanted > 0:
            return wanted
    return max(1, len(os.sched_getaffinity(0)))


def be_nice(directory: Path | None) -> None:
    """Lower this supervised worker's CPU priority (``directory``: it passes the gate)."""
    if directory is not None:
        spawning.be_nice()


def server_id(argv: Sequence[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--srvid" and i + 1 < len(argv):
            with contextlib.suppress(ValueError):
                return int(argv[i + 1])
        if arg.startswith("--srvid="):
            with contextlib.suppress(ValueError):
                return int(arg.split("=", 1)[1])
    return 0


def wanted(argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """The slot directory when this process should pass the gate, else None.

    Only a worker supervisord started queues (an operator's ``--once`` does
    not), and only when its fleet directory is known.
    """
    if not environ.get("SUPERVISOR_ENABLED") or "--once" in argv:
        return None
    path = config_path(argv)
    return Path(path).absolute().parent / ".start" if path else None


class _Timeout(Exception):
    pass


def _give_up(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


def _open_slot(directory: Path, slot: int) -> int:
    directory.mkdir(mode=0o700, exist_ok=True)
    return os.open(directory / f"slot_{slot}", os.O_WRONLY | os.O_CREAT, 0o600)


@contextlib.contextmanager
def held(directory: Path | None, srvid: int, count: int | None = None,
         max_wait: int = MAX_WAIT) -> Iterator[bool]:
    """Hold a start slot for the body; yields whether one was taken.

    Any trouble with the slot files (a read-only directory...) opens the gate:
    a worker that cannot queue starts at once rather than not at all.
    """
    if directory is None:
        yield False
        return
    count = count or slots()
    try:
        fd = _open_slot(directory, srvid % count)
    except OSError:
        yield False
        return
    taken = False
    try:
        taken = _take(fd, max_wait)
        yield taken
    finally:
        os.close(fd)  # releases the lock


def _take(fd: int, max_wait: int) -> bool:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    previous = signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(max_wait)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except (_Timeout, OSError):
        return False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
