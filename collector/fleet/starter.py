"""The fleet's worker programs started in waves, by the event listener.

supervisord starts every ``autostart`` program in one pass of its loop, and
answers nothing meanwhile: no XML-RPC, no event to its listeners.  For 800
workers that pass took 46 s on a 2-core host (7 ms of supervisord's own per
program, and the programs it had started competing with it for the CPU),
during which the control could only answer from a picture it knew to be
stale.  So worker programs are written with ``autostart = false``, and this
thread, in the event listener (collector.fleet.programs), starts them a wave
at a time:

* a wave is every worker program supervisord has never started (``STOPPED``
  with no start time), up to ``[fleet] start_wave`` of them (default: 50 per
  usable CPU), lowest server ids first, started by one ``system.multicall``;
* the next wave waits until every program of this one has left ``STARTING``
  (it is ``RUNNING`` after ``startsecs``, or ``BACKOFF``...), as the events
  say, or ``WAVE_WAIT`` seconds;
* it looks at supervisord's table when the listener starts (supervisord's own
  start, a ``reload``), when a group is added (``supervisorctl update``, a
  RELOAD, the generator), every minute (an event lost in a full buffer), and
  again after supervisord failed to answer.

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

#: workers started together, per CPU this host lets the fleet use
WAVE_PER_CPU = 50
#: longest wait for a wave to leave STARTING before the next one goes
WAVE_WAIT = 30.0
#: after supervisord failed to answer, it is asked again this much later
RETRY = 5.0
#: an answer to a whole-table read or a wave's start may take this long
TIMEOUT = 60.0


def default_wave() -> int:
    return WAVE_PER_CPU * max(1, len(os.sched_getaffinity(0)))


def never_started(name: str, info: dict[str, Any]) -> bool:
    """A worker program that supervisord has not started since it knows it."""
    return (worker_id(name) is not None and info.get("statename") == "STOPPED"
            and not info.get("start"))


def due(processes: dict[str, dict[str, Any]]) -> list[str]:
    """The worker programs to start, lowest server id first."""
    names = [name for name, info in processes.items() if never_started(name, info)]
    return sorted(names, key=lambda name: worker_id(name) or 0)


class Starter(threading.Thread):
    def __init__(self, socket_path: Any, wave: int,
                 connect: Callable[[], Supervisor] | None = None,
                 wave_wait: float = WAVE_WAIT) -> None:
        super().__init__(name="starter", daemon=True)
        self.wave = max(1, wave)
        self.wave_wait = wave_wait
        self._connect = connect or (lambda: Supervisor(socket_path, timeout=TIMEOUT))
        self._wanted = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        #: programs of the wave under way that have not left STARTING yet
        self._pending: set[str] = set()
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
            if name in self._pending:
                self._pending.discard(name)
                if not self._pending:
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
        waves = 0
        begun = time.monotonic()
        while not self._closing.is_set():
            waiting = due(supervisor.all_processes())
            if not waiting:
                break
            wave = waiting[:self.wave]
            waves += 1
            log.info("starting %d worker programs (%d more waiting)", len(wave),
                     len(waiting) - len(wave))
            with self._lock:
                self._pending = set(wave)
                self._progress.clear()
            missed = self._start(supervisor, wave)
            for name, why in missed.items():
                if why:
                    log.warning("%s: supervisord did not start it: %s", name, why)
            with self._lock:
                self._pending -= set(missed)
                self.started += len(wave) - len(missed)
                if not self._pending:
                    self._progress.set()
            if not self._progress.wait(self.wave_wait):
                with self._lock:
                    late = sorted(self._pending)
                log.warning("%d worker programs still starting after %.0f s (%s): the next"
                            " wave goes", len(late), self.wave_wait, ", ".join(late[:5]))
            with self._lock:
                self._pending = set()
        if not waves:
            log.debug("no worker program waiting to be started")
        elif waves > 1:
            log.info("worker programs started in %d waves, %.1f s", waves,
                     time.monotonic() - begun)

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
