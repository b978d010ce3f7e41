"""The worker process: keeps one remote server's PoWA history flowing into the repository.

    python -m collector.worker -c CFG --srvid N [--once]

It reads its server row from the repository (never from argv), keeps a
persistent connection to the remote, takes a snapshot every ``frequency``
seconds (resuming the cadence from ``snapts``), publishes its status in
Redis and answers commands of the control process.  An unreachable remote
or repository never makes it exit: it reports the condition and recovers by
itself.  It exits only when stopped, or when its server cannot be collected
at all (unknown id: exit 3, frequency -1: exit 4; supervisord is told not to
restart those).

SIGHUP re-reads the server row.  SIGTERM (or SIGINT) stops: nothing new is
started, a running snapshot gets ``stop_grace`` seconds to finish, then is
cancelled and rolled back; a second SIGTERM cancels at once.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time

from collector import config, daemon, mailbox, repository
from collector.backoff import Backoff
from collector.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    FleetError,
    RepositoryUnavailable,
    ServerDisabledError,
    UnknownServerError,
)
from collector.keys import (
    STATUS_NO_REMOTE,
    STATUS_NO_REPOSITORY,
    STATUS_RUNNING,
    STATUS_STOPPING,
    program_name,
)
from collector.mailbox import Listener
from collector.plugins import Dispatcher, NullDispatcher, load_dispatcher
from collector.wakeup import SignalFlags, Wakeup
from collector.worker.commands import CommandHandler
from collector.worker.databases import CatalogRefresh
from collector.worker.failures import Failures
from collector.worker.gate import ForceGate
from collector.worker.link import RemoteLink
from collector.worker.reporter import START_WRITE_WITHIN, Reporter
from collector.worker.schedule import Schedule
from collector.worker.snapshot import SnapshotResult
from collector.worker.state import ServerState
from collector.worker.taker import Taker
from collector.worker.watchdog import Watchdog

log = logging.getLogger("collector.worker")

#: the main loop wakes at least this often, even with nothing to do (signals,
#: commands and a dying remote connection wake it at once anyway)
MAX_SLEEP = 60.0


class Worker:
    """One server's collector; ``run()`` returns the process exit code.

    Its parts: ``state`` (counters, errors), ``gate`` (running or forced
    snapshots, shared with the command thread), ``link`` (the remote
    connection and its retries), ``reporter`` (Redis status and plugin
    events), ``watchdog`` (deadlines), ``schedule`` (when the next one is due).
    """

    def __init__(
        self,
        cfg: config.Config,
        srvid: int,
        once: bool = False,
        events: Dispatcher | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.srvid = srvid
        self.once = once
        self.rng = rng or random.Random()
        self.wakeup = Wakeup()
        self.flags = SignalFlags(self.wakeup)
        self.state = ServerState(srvid, host=cfg.fleet.host)
        self.gate = ForceGate()
        #: REFRESH_DB_CAT requests waiting for the next snapshot
        self.catalog_refresh = CatalogRefresh()
        self.reporter = Reporter(self.state, self.gate, events or NullDispatcher())
        self.watchdog = Watchdog(self.flags, cfg.collector.stop_grace, self._notice_stop)
        self.link = RemoteLink(cfg.collector.connect_timeout, self.watchdog, self.rng)
        self.failures = Failures(cfg, self.reporter, self.link, self.flags, self.publish)
        self.taker = Taker(cfg, self.link, self.watchdog, self.failures, self.catalog_refresh)
        #: answers the control's commands, in the command thread
        self.handle_command = CommandHandler(self.gate, self.catalog_refresh, self.wakeup.notify)
        self.schedule: Schedule | None = None
        self.commands: Listener | None = None
        #: a SIGHUP that could not read the row yet is tried again then
        self.reload_retry_at: float | None = None
        self.reload_backoff = Backoff(maximum=30.0, rng=self.rng)

    # ------------------------------------------------------------------ life cycle
    def run(self) -> int:
        self.flags.install()
        try:
            if self.once:
                return run_once(self)
            self._start_threads()
            if not self._load_server():
                return EXIT_OK
            self._loop()
            self.publish()
            return EXIT_OK
        except (UnknownServerError, ServerDisabledError) as exc:
            if self.once:
                print(f"{program_name(self.srvid)}: {exc}", file=sys.stderr)
            else:
                log.error("%s: exiting, supervisord will not restart this worker", exc)
            return exc.exit_code
        finally:
            self.shutdown()

    def _start_threads(self) -> None:
        self.reporter.start(self.cfg)
        self.commands = Listener(
            self.cfg.redis.url, self.cfg.redis.prefix, self.srvid, self.handle_command,
            key=mailbox.fleet_key(self.cfg.directory),
        )
        self.commands.start()
        self.watchdog.start()

    def _load_server(self) -> bool:
        """Read the server row until the repository answers; False if stopped meanwhile."""
        backoff = Backoff(maximum=30.0, rng=self.rng)
        while not self.flags.stop:
            try:
                self.read_server()
            except RepositoryUnavailable as exc:
                self.failures.repository(str(exc))
                self.wakeup.wait(backoff.next_delay())
                continue
            self._connect_remote()
            return True
        return False

    def read_server(self) -> None:
        """(Re)read the server row and its last snapshot time; adopt what changed."""
        server, snapts = repository.load_server(self.cfg.repository.dsn, self.srvid,
                                                self.cfg.repository.connect_timeout)
        self.state.repository_down = False
        previous, self.state.server = self.state.server, server
        log.info("collecting %s every %ss", server.describe(self.cfg.collector.use_server_alias),
                 server.frequency)
        now = time.monotonic()
        if self.schedule is None:
            last = snapts.timestamp() if snapts is not None else None
            self.schedule = Schedule.resume(server.frequency, last, time.time(), now, self.rng)
            self.reporter.schedule = self.schedule
        else:
            self.schedule.change_frequency(server.frequency, now)
        self.link.adopt(previous, server)

    def shutdown(self) -> None:
        """Tear everything down, each step on its own."""
        daemon.teardown(log, [
            ("repository session", self.taker.close),
            ("remote connection", self.link.close),
            ("watchdog", self.watchdog.close),
            ("commands", lambda: self.commands.close() if self.commands else None),
            ("status", self.reporter.close),
            ("plugins", self.reporter.events.close),
            ("signals", self.flags.uninstall),
            ("wakeup", self.wakeup.close),
        ])

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> None:
        """Cycle until stopped; a bad cycle is logged and never ends the process."""
        backoff = Backoff(initial=1.0, maximum=60.0, rng=self.rng)
        while not self.flags.stop:
            try:
                self._cycle()
            except (UnknownServerError, ServerDisabledError):
                raise
            except Exception as exc:
                log.exception("unexpected error in the worker's loop, going on")
                self.failures.error(f"internal error: {exc!r}")
                self.wakeup.wait(backoff.next_delay())
            else:
                backoff.reset()

    def _cycle(self) -> None:
        assert self.schedule is not None
        now = time.monotonic()
        if self.flags.reload or (self.reload_retry_at is not None and now >= self.reload_retry_at):
            self.flags.reload = False
            self._reload()
            now = time.monotonic()
        if self.link.due(now):
            self._connect_remote()
        forced = self.gate.pending
        if not self.flags.stop and (forced or self.schedule.due(time.monotonic())):
            self.snapshot(forced)
        self._sleep()

    def _sleep(self) -> None:
        assert self.schedule is not None
        until = self.schedule.next_due
        if not self.link.connected:
            until = min(until, self.link.next_attempt)
        if self.reload_retry_at is not None:
            until = min(until, self.reload_retry_at)
        timeout = min(until - time.monotonic(), MAX_SLEEP)
        if self.flags.stop or self.flags.reload or timeout <= 0:
            return
        ready = self.wakeup.wait(timeout, self.link.watched_fd())
        if ready and not self.link.check_alive():
            self.failures.remote("connection to the remote server lost", report=False)

    def _reload(self) -> None:
        log.info("SIGHUP: reading the server row again")
        try:
            self.read_server()
        except RepositoryUnavailable as exc:
            self.failures.repository(str(exc))
            # try again later, not in a tight loop while the repository is away
            self.reload_retry_at = time.monotonic() + self.reload_backoff.next_delay()
            return
        self.reload_retry_at = None
        self.reload_backoff.reset()
        self.publish()

    # ------------------------------------------------------------------ failures
    def _connect_remote(self) -> bool:
        error = self.link.connect()
        if error is not None:
            self.failures.remote(error, report=False)
            return False
        self.publish()
        return True

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, forced: bool) -> SnapshotResult | None:
        assert self.schedule is not None
        self.schedule.started(self.gate.begin(), forced)
        # most snapshots end within a second: their start and end make one write
        self.reporter.publish(self.current_status(), within=START_WRITE_WITHIN)
        result = None
        try:
            result = self._attempt(forced)
        finally:
            self.gate.end()
            # the next scheduled snapshot's remote deadline is a period after its start
            self.watchdog.disarm(quiet_until=self.schedule.next_due + self.schedule.frequency)
            self.reporter.snapshot(result, self.current_status())
        return result

    def _attempt(self, forced: bool) -> SnapshotResult | None:
        assert self.state.server is not None and self.link.session is not None
        # the loop just tried and is backing off: do not try twice in one cycle
        ready = self.link.connected or (self.link.due(time.monotonic())
                                        and self._connect_remote())
        if ready and (lost := self.link.versions_current()) is not None:
            self.failures.remote(lost, report=False)
            ready = False
        if not ready:
            self.failures.report(f"Error connecting to remote server {self.srvid}: "
                                 f"{self.state.last_error}")
            return None
        return self.taker.take(self.state.server.frequency, forced)

    # ------------------------------------------------------------------ commands, status
    def current_status(self) -> str:
        if self.flags.stop:
            return STATUS_STOPPING
        if self.state.repository_down:
            return STATUS_NO_REPOSITORY
        if not self.link.connected:
            return STATUS_NO_REMOTE if self.state.server is not None else STATUS_NO_REPOSITORY
        if self.state.held_by is not None:
            return f"standby: collected by host {self.state.held_by}"
        return STATUS_RUNNING

    def publish(self) -> None:
        self.reporter.publish(self.current_status())

    def _notice_stop(self) -> None:
        """Called by the watchdog thread as soon as a stop is requested."""
        self.reporter.quick(STATUS_STOPPING)


def run_once(worker: Worker) -> int:
    """One snapshot, no status publishing (a running worker owns the status key)."""
    name = program_name(worker.srvid)
    try:
        worker.read_server()
    except RepositoryUnavailable as exc:
        print(f"{name}: {STATUS_NO_REPOSITORY}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    worker.watchdog.start()
    result = worker.snapshot(forced=True)
    if result is None or result.outcome == "failed":
        reason = (f"collected by host {worker.state.held_by} (it holds the lease)"
                  if worker.state.held_by else worker.state.last_error or "snapshot failed")
        print(f"{name}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{name}: snapshot stored in {result.duration:.3f}s, "
          f"{sum(result.rows.values())} rows, {result.error_count} error(s)")
    for error in result.errors:
        print(f"{name}: {error}")
    return EXIT_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m collector.worker",
        description="Collect PoWA snapshots of one remote server.",
    )
    daemon.config_argument(parser)
    parser.add_argument("--srvid", type=int, required=True, help="powa_servers.id to collect")
    parser.add_argument("--once", action="store_true",
                        help="take one snapshot and exit: 0 when stored (a summary on stdout), "
                             "non-zero with a one-line reason on stderr")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --once, log as the daemon does (on stderr)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    program = program_name(args.srvid)
    quiet = args.once and not args.verbose
    cfg = daemon.load_config(program, args.config, "critical" if quiet else None)
    try:
        events = load_dispatcher(cfg, args.srvid)
    except FleetError as exc:
        return daemon.fatal(program, exc)
    return daemon.settle(Worker(cfg, args.srvid, once=args.once, events=events).run())


if __name__ == "__main__":
    sys.exit(main())
