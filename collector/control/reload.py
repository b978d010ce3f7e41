"""RELOAD, off the NOTIFY loop: regenerate the fleet, apply it to supervisord, tell workers.

One thread runs reloads one at a time.  Requests that arrive while one runs
are queued and served together by the next run (never lost, never two at
once).  A run has two phases:

* plan: read ``collector.cfg`` again (a bad one is refused: ``RELOAD ERROR``
  with the reason, and everything keeps running as it is), read
  ``powa_servers``, write the program files, let supervisord re-read them
  (``reloadConfig``): now the difference is known, or the reason it cannot
  be applied;
* execute: stop removed and changed programs (waiting for their snapshots to
  end), add new ones, SIGHUP the workers whose row changed.

The requesters are answered when the run is done, or ``ANSWER_WITHIN``
seconds after their request once the configuration is accepted, whatever
remains (powa-web waits 1-3 s; adding 400 servers takes seconds to write
and re-read and a minute to start: what remains is logged, and ``status``
shows the programs as they come up).  A refused configuration, or a run
that fails before the answer, answers ``ERROR`` with the reason.  The answers go back to
the NOTIFY loop through ``outbox``; only that loop talks on its connection.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from collector import config, counters, hosts, logs, repository
from collector.config import Config
from collector.control.board import StatusBoard, WorkerView
from collector.control.healer import Healer
from collector.errors import ConfigError, FleetError
from collector.fleet import bytecode, files
from collector.fleet.supervisord import ApplyReport, Supervisor
from collector.keys import (
    CONTROL,
    STATUS_NO_REMOTE,
    STATUS_NO_REPOSITORY,
    client,
    program_name,
)
from collector.repository import Server

log = logging.getLogger("collector.control")

#: answer a RELOAD whose configuration was accepted at the latest this long after it was
#: asked (powa-web gives up after 1-3 s; the rest of the run is logged)
ANSWER_WITHIN = 0.5
#: the programs are looked after this often (seconds) when no reload runs
HEAL_EVERY = 15.0
#: supervisord states with a worker process that read its row already
ALIVE = ("STARTING", "RUNNING")

#: who asked: the response channel, None for a SIGHUP or a request wanting no answer
Requester = str | None
Answer = tuple[str, str, str]


@dataclass
class _Run:
    requesters: list[Requester]
    asked_at: float
    answered: bool = False


class Reloader(threading.Thread):
    def __init__(self, cfg: Config, board: StatusBoard, notify: Callable[[], None]) -> None:
        super().__init__(name="reload", daemon=True)
        self.cfg = cfg
        self.board = board
        self.notify = notify
        #: (channel, status, data) answers for the NOTIFY loop to send
        self.outbox: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self._queued: list[Requester] = []
        self._queued_at = 0.0
        self._wake = threading.Event()
        self._answer_lock = threading.Lock()
        #: fingerprint of every server row as last told to its worker
        self.fingerprints: dict[int, str] = {}
        #: a run is under way (for tests and the operator)
        self.busy = threading.Event()
        first = cfg.collector.restart_fatal_after
        self.healer = Healer(first_delay=first) if first else None
        self.heal_every = min(HEAL_EVERY, max(1.0, first / 2)) if first else HEAL_EVERY
        self._heal_outage = logs.Outage(log, "cannot look after FATAL programs now")
        #: the live collector hosts this host shares the servers with (None: not seen yet)
        self.view: list[str] | None = hosts.saved_view(cfg)
        #: the servers this host collects, as of the last reload
        self.owned: list[int] = []
        #: the servers other live hosts collect, and which host (as of the last reload)
        self.others: dict[int, str] = {}
        #: told which servers this host collects after each reload
        self.on_owned: Callable[[set[int]], None] = lambda owned: None

    def share(self, view: list[str]) -> None:
        """The live hosts changed: the next reload takes this host's new share."""
        self.view = list(view)

    def request(self, requester: Requester) -> None:
        """Queue a reload for ``requester`` (answered later, through ``outbox``)."""
        with self._lock:
            if not self._queued:
                self._queued_at = time.monotonic()
            self._queued.append(requester)
        self._wake.set()

    def close(self, timeout: float) -> None:
        """Stop: a run under way stops waiting for programs (supervisord goes on)."""
        self.cancel.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        self.fingerprints = self._baseline()
        while not self.cancel.is_set():
            if not self._wake.wait(self.heal_every):
                if self.healer is not None:
                    try:
                        self._heal()
                    except Exception:
                        log.exception("looking after FATAL programs failed, going on")
                continue
            with self._lock:
                self._wake.clear()
                run = _Run(self._queued, self._queued_at)
                self._queued = []
            if run.requesters and not self.cancel.is_set():
                self.busy.set()
                try:
                    self._serve(run)
                except Exception as exc:
                    # a bad run never ends the thread: later RELOADs would wait forever
                    log.exception("reload failed unexpectedly")
                    self._answer(run, "ERROR", logs.one_line(exc))
                finally:
                    self.busy.clear()

    def _heal(self) -> None:
        """Start again the programs supervisord gave up on (see collector.control.healer)."""
        assert self.healer is not None
        supervisor = Supervisor(self.cfg.supervisor_socket, timeout=30)
        try:
            due = self.healer.due(supervisor.all_processes(), time.time())
            for name in due:
                log.warning("%s: starting it again (attempt %d; supervisord had given up)",
                            name, self.healer.attempts(name))
                supervisor.start(name)
        except FleetError as exc:
            self._heal_outage.failed(exc)
            return
        self._heal_outage.recovered("looking after FATAL programs again")

    def _serve(self, run: _Run) -> None:
        started = time.monotonic()
        try:
            self._reread_config()
        except ConfigError as exc:
            self._failed(run, started, "reload refused", exc)
            return
        # from here on the work may take minutes (hundreds of programs to write,
        # re-read and start): the requesters hear OK at once, the rest is logged
        timer = threading.Timer(max(0.0, run.asked_at + ANSWER_WITHIN - time.monotonic()),
                                self._answer, (run, "OK", "OK"))
        timer.daemon = True
        timer.start()
        try:
            servers, generated, supervisor, planned = self._plan()
            supervisor.execute(planned, self.cancel)
            # the leases follow the programs: released once the old ones stopped
            self.on_owned(set(self.owned))
            signalled = self._tell_workers(supervisor, servers)
        except (FleetError, psycopg.Error) as exc:
            timer.cancel()
            self._failed(run, started, "reload failed", exc)
            return
        timer.cancel()
        self._answer(run, "OK", "OK")
        counters.record_reload(self.cfg.redis, "ok", time.monotonic() - started)
        log.info(
            "reload done in %.2fs: %d new, %d removed, %d started, %d stopped, %d re-read",
            time.monotonic() - started, len(generated.added), len(generated.removed),
            len(planned.added), len(planned.removed), len(signalled),
        )

    def _failed(self, run: _Run, started: float, what: str, exc: Exception) -> None:
        """Log and count a failed run; answer ERROR unless OK went out already."""
        if run.answered:
            log.error("%s after it was answered OK: %s", what, logs.one_line(exc))
        else:
            log.error("%s: %s", what, logs.one_line(exc))
        self._answer(run, "ERROR", logs.one_line(exc))
        counters.record_reload(self.cfg.redis, "error", time.monotonic() - started)

    def _plan(self) -> tuple[list[Server], files.Report, Supervisor, ApplyReport]:
        servers = self._servers()
        view = self.view
        if view is None:
            with contextlib.closing(client(self.cfg.redis.url)) as connection:
                view, _ = hosts.current_view(self.cfg, connection)
        self._share_out([s.srvid for s in servers], view)
        generated = files.generate(self.cfg, self.owned)
        # new workers find their bytecode compiled (collector.fleet.bytecode)
        bytecode.warm_for(self.cfg, generated)
        if generated.restart_needed:
            log.warning("%s", generated.lines()[-1])
        supervisor = Supervisor(self.cfg.supervisor_socket)
        # restarting itself from inside a request would kill this very request
        return servers, generated, supervisor, supervisor.plan(keep=CONTROL)

    @staticmethod
    def _owners(srvids: list[int], view: list[str]) -> dict[int, str]:
        return {srvid: hosts.owner(srvid, view) or "" for srvid in srvids}

    def _share_out(self, srvids: list[int], view: list[str]) -> None:
        """This host's servers and the other hosts' ones, under ``view``."""
        me = self.cfg.fleet.host
        owners = self._owners(srvids, sorted(set(view) | {me}))
        self.owned = [s for s, host in owners.items() if host == me]
        self.others = {s: host for s, host in owners.items() if host != me}

    def _reread_config(self) -> None:
        """The configuration as it is now on disk; ConfigError (nothing changed) if invalid.

        What the programs' files are made of (paths, stop grace, the web UI) is
        taken at once; settings the control itself runs with (the repository's
        and Redis's addresses) wait for its restart, and the log says so.
        """
        try:
            fresh = config.load(self.cfg.path)
        except ConfigError as exc:
            raise ConfigError([f"configuration refused, nothing changed: {exc.problems[0]}"
                               + (f" (and {len(exc.problems) - 1} more problems)"
                                  if len(exc.problems) > 1 else "")]) from None
        for name in ("repository", "redis"):
            if getattr(fresh, name) != getattr(self.cfg, name):
                log.warning("needs restart: [%s] changed, the control takes it at its next"
                            " restart (supervisorctl restart control)", name)
        logs.REDACTOR.add(*fresh.secrets())
        self.cfg = fresh

    def _answer(self, run: _Run, status: str, data: str) -> None:
        """Answer every requester of a run, once (the timer and the run race for it)."""
        with self._answer_lock:
            if run.answered:
                return
            run.answered = True
        for channel in run.requesters:
            if channel is not None:
                self.outbox.put((channel, status, data))
        self.notify()

    def _servers(self) -> list[Server]:
        with repository.session(self.cfg.repository.dsn, "control reload",
                                self.cfg.repository.connect_timeout) as conn:
            return repository.list_servers(conn, repository.require_powa(conn))

    def _baseline(self) -> dict[int, str]:
        """The rows as the running workers read them at their start, near enough.

        The servers this host runs programs for are its share until a reload
        says otherwise: their leases are taken from the start.
        """
        self.owned = sorted(files.available(self.cfg))
        self.on_owned(set(self.owned))
        try:
            servers = self._servers()
            if self.view is not None:
                self.others = {s: h for s, h in self._owners([x.srvid for x in servers],
                                                             self.view).items()
                               if s not in self.owned}
            return fingerprints(servers)
        except (FleetError, psycopg.Error) as exc:
            log.warning("cannot read powa_servers yet: %s", logs.one_line(exc))
            return {}

    def _tell_workers(self, supervisor: Supervisor, servers: list[Server]) -> list[int]:
        """SIGHUP the workers whose row changed, and those that lost a connection."""
        current = fingerprints(servers)
        changed = {s for s, fp in current.items()
                   if s in self.fingerprints and self.fingerprints[s] != fp}
        # only a worker that published its status has its SIGHUP handler in place (a
        # starting one would die of it); it re-reads its row when changed, and retries
        # its connections at once when it had lost them, as upstream's reload does
        views = self.board.views()
        lost = (STATUS_NO_REMOTE, STATUS_NO_REPOSITORY)
        wanted = [view.srvid for view in views
                  if _published(view) and (view.srvid in changed or view.status in lost)]
        # a worker not running reads its row when it starts: nothing to tell it
        reached = [view.srvid for view in views
                   if view.srvid in changed and view.program_state not in ALIVE]
        signalled: list[int] = []
        try:
            for srvid in wanted:
                if supervisor.signal(program_name(srvid), "HUP"):
                    signalled.append(srvid)
        finally:
            self.fingerprints = told(self.fingerprints, current, reached + signalled)
        unreached = len(changed - set(reached) - set(signalled))
        if unreached:
            log.warning("%d worker(s) with a changed row could not be told now (not running,"
                        " or no status in Redis): the next reload tells them", unreached)
        return signalled


def fingerprints(servers: list[Server]) -> dict[int, str]:
    return {server.srvid: server.fingerprint() for server in servers}


def told(previous: dict[int, str], current: dict[int, str],
         reached: list[int]) -> dict[int, str]:
    """The rows each worker is known to run with, once a reload ``reached`` these workers.

    A changed row counts as known only once its worker got the SIGHUP (or
    was not running, and reads it when it starts): one that could not be
    told keeps its old fingerprint, so the next reload sees the change again
    instead of forgetting it.
    """
    return {
        srvid: previous[srvid]
        if srvid in previous and previous[srvid] != fp and srvid not in reached else fp
        for srvid, fp in current.items()
    }


def _published(view: WorkerView) -> bool:
    """The running process of this program wrote its own status."""
    return (view.program_state == "RUNNING" and view.document is not None
            and view.document.get("pid") == view.pid)
