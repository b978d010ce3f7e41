"""The fleet's worker programs started at a pace, by the event listener.

supervisord starts every ``autostart`` program in one pass of its loop, and
answers nothing meanwhile: no XML-RPC, no event to its listeners.  For 800
workers that pass took 46 s on a 2-core host (7 ms of supervisord's own per
program, and the programs it had started competing with it for the CPU),
during which the control could only answer from a picture it knew to be
stale.  Waves of a hundred (the first cut) kept supervisord answering, but
each wave put a hundred interpreters at once beside the control: its answers
took up to 160 ms.  So worker programs are written with ``autostart =
false``, and this thread, in the event listener (collector.fleet.programs),
starts them at a steady pace:

* what it starts is every worker program supervisord has never started
  (``STOPPED`` with no start time), lowest server ids first;
* ``[fleet] start_rate`` programs a second (default: 8 per usable CPU), a
  few every ``STEP`` seconds in one ``system.multicall``, so that only a
  handful of new processes compete with the control at any moment;
* at most ``WINDOW`` seconds' worth of them in ``STARTING`` at once (as the
  events say; one that has not left it after ``STALE`` seconds stops
  counting): a host slower than the pace slows the pace down;
* it looks at supervisord's table when the listener starts (supervisord's
  own start, a ``reload``), when a group is added (``supervisorctl update``,
  a RELOAD, the generator), every minute (an event lost in a full buffer),
  and again after supervisord failed to answer.

A program an operator started or stopped has a start time: it is left as it
is, so ``supervisorctl stop worker_N`` keeps meaning what it says.  Only one
that supervisord never started is started here, which is what ``autostart``
did.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from collector.errors import SupervisorError
from collector.fleet.supervisord import Supervisor
from collector.keys import worker_id

log = logging.getLogger("collector.fleet.starter")

#: programs started a second, per CPU this host lets the fleet use
RATE_PER_CPU = 8
#: a few programs are started about every this many seconds (one a second at least)
STEP = 0.25
#: at most this many seconds' worth of programs are STARTING at once
WINDOW = 5.0
#: a program that has not left STARTING after this long stops holding the pace
STALE = 30.0
#: after supervisord failed to answer, it is asked again this much later
RETRY = 5.0
#: an answer to a whole-table read or a start may take this long
TIMEOUT = 60.0


def default_rate() -> int:
    return RATE_PER_CPU * max(1, len(os.sched_getaffinity(0)))


def never_started(name: str, info: dict[str, Any]) -> bool:
    """A worker program that supervisord has not started since it knows it."""
    return (worker_id(name) is not None and info.get("statename") == "STOPPED"
            and not info.get("start"))


def due(processes: dict[str, dict[str, Any]]) -> list[str]:
    """The worker programs to start, lowest server id first."""
    names = [name for name, info in processes.items() if never_started(name, info)]
    return sorted(names, key=lambda name: worker_id(name) or 0)


class Starter(threading.Thread):
    def __init__(self, socket_path: Any, rate: int,
                 connect: Callable[[], Supervisor] | None = None) -> None:
        super().__init__(name="starter", daemon=True)
        self.rate = max(1, rate)
        #: programs per multicall, the seconds between two, and the most STARTING at once
        self.step = max(1, round(self.rate * STEP))
        self.interval = self.step / self.rate
        self.window = max(self.step, round(self.rate * WINDOW))
        self._connect = connect or (lambda: Supervisor(socket_path, timeout=TIMEOUT))
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        #: programs started that have not left STARTING yet, and when they were started
        self._pending: dict[str, float] = {}
        self._progress = threading.Event()
        #: programs started so far (tests and the log read it)
        self.started = 0

    # ------------------------------------------------------------ the listener's side
    def wake(self) -> None:
        """Look at supervisord's table soon (the listener started, a group was added...)."""
        self._wanted.set()

    def seen(self, name: str, state: str) -> None:
        """A program's new state, from an event."""
        if state == "STARTING":
            return
        with self._lock:
            if self._pending.pop(name, None) is not None:
                self._progress.set()

    def close(self) -> None:
        self._closing.set()
        self._wanted.set()
        self._progress.set()

    # ------------------------------------------------------------ the thread
    def run(self) -> None:
        while not self._closing.is_set():
            self._wanted.wait()
            self._wanted.clear()
            if self._closing.is_set():
                return
            try:
                self._start_all()
            except SupervisorError as exc:
                if "SHUTDOWN_STATE" in str(exc):
                    # supervisord stops, and this listener with it
                    continue
                log.warning("cannot start the worker programs yet (trying again in %.0f s): %s",
                            RETRY, exc)
                if not self._closing.wait(RETRY):
                    self._wanted.set()
            except Exception:
                # a dead starter would leave every later worker program unstarted
                log.exception("starting worker programs failed; trying again")
                if not self._closing.wait(RETRY):
                    self._wanted.set()

    def _start_all(self) -> None:
        supervisor = self._connect()
        waiting = due(supervisor.all_processes())
        if not waiting:
            log.debug("no worker program waiting to be started")
            return
        if len(waiting) > self.step:
            log.info("starting %d worker programs, %d a second", len(waiting), self.rate)
        begun = time.monotonic()
        next_at = begun
        started = 0
        for first in range(0, len(waiting), self.step):
            names = waiting[first:first + self.step]
            if not self._wait_turn(next_at, len(names)):
                return
            next_at = max(next_at + self.interval, time.monotonic())
            missed = self._start(supervisor, names)
            if any("SHUTDOWN_STATE" in why for why in missed.values()):
                log.info("supervisord is shutting down: no more worker programs started")
                return
            for name, why in missed.items():
                if why:
                    log.warning("%s: supervisord did not start it: %s", name, why)
            now = time.monotonic()
            with self._lock:
                for name in names:
                    if name not in missed:
                        self._pending[name] = now
            started += len(names) - len(missed)
            self.started += len(names) - len(missed)
        if len(waiting) > self.step:
            log.info("%d worker programs started in %.1f s", started, time.monotonic() - begun)
        # groups added meanwhile had their wake-up: look again
        self._wanted.set()

    def _wait_turn(self, at: float, count: int) -> bool:
        """Wait for the pace's next step, and for room in the window; False when closing."""
        while not self._closing.is_set():
            now = time.monotonic()
            with self._lock:
                for name, since in list(self._pending.items()):
                    if now - since > STALE:
                        log.warning("%s still starting after %.0f s: no longer waited for",
                                    name, STALE)
                        del self._pending[name]
                room = len(self._pending) + count <= self.window
                self._progress.clear()
            if room and now >= at:
                return True
            # an event frees room; the pace's next step comes by itself
            self._progress.wait(max(0.0, at - now) if room else STALE)
        return False

    @staticmethod
    def _start(supervisor: Supervisor, names: list[str]) -> dict[str, str]:
        """Start these programs without waiting; {name: why} of those that did not start
        (why is empty for one started meanwhile by someone else, or removed)."""
        results = supervisor.multicall([("startProcess", (name, False)) for name in names])
        missed = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, dict) and "faultString" in result:
                fault = str(result["faultString"])
                quiet = any(code in fault for code in ("ALREADY_STARTED", "BAD_NAME"))
                missed[name] = "" if quiet else fault
        return missed
