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

import psycopg

from collector import config, daemon, logs, repository
from collector.backoff import Backoff
from collector.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    ConcurrentSnapshotError,
    FleetError,
    RemoteUnavailable,
    RepositoryUnavailable,
    ServerDisabledError,
    SnapshotAborted,
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
from collector.worker.gate import ForceGate
from collector.worker.link import RemoteLink
from collector.worker.reporter import Reporter
from collector.worker.schedule import Schedule
from collector.worker.snapshot import Snapshot, SnapshotResult
from collector.worker.state import ServerState
from collector.worker.watchdog import Watchdog

log = logging.getLogger("collector.worker")

#: the repository part of a snapshot gets this long (or ten periods) before it is cancelled:
#: a big aggregation may take long, a repository that never answers must not stall a worker
REPOSITORY_BUDGET = 600.0
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
        self.state = ServerState(srvid)
        self.gate = ForceGate()
        self.reporter = Reporter(self.state, self.gate, events or NullDispatcher())
        self.watchdog = Watchdog(self.flags, cfg.collector.stop_grace, self._notice_stop)
        self.link = RemoteLink(cfg.collector.connect_timeout, self.watchdog, self.rng)
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
                return self._run_once()
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
            self.cfg.redis.url, self.cfg.redis.prefix, self.srvid, self.handle_command
        )
        self.commands.start()
        self.watchdog.start()

    def _load_server(self) -> bool:
        """Read the server row until the repository answers; False if stopped meanwhile."""
        backoff = Backoff(maximum=30.0, rng=self.rng)
        while not self.flags.stop:
            try:
                self._read_server()
            except RepositoryUnavailable as exc:
                self._repository_failed(str(exc))
                self.wakeup.wait(backoff.next_delay())
                continue
            self._connect_remote()
            return True
        return False

    def _read_server(self) -> None:
        """(Re)read the server row and its last snapshot time; adopt what changed."""
        with repository.session(
            self.cfg.repository.dsn, f"worker {self.srvid}", self.cfg.repository.connect_timeout
        ) as conn:
            try:
                powa = repository.require_powa(conn)
                server = repository.read_server(conn, powa, self.srvid)
                snapts = repository.last_snapshot(conn, powa, self.srvid)
            except psycopg.Error as exc:
                raise RepositoryUnavailable(logs.one_line(exc)) from None
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
                self._error(f"internal error: {exc!r}")
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
            self._snapshot(forced)
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
            self._remote_failed("connection to the remote server lost", report=False)

    def _reload(self) -> None:
        log.info("SIGHUP: reading the server row again")
        try:
            self._read_server()
        except RepositoryUnavailable as exc:
            self._repository_failed(str(exc))
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
            self._remote_failed(error, report=False)
            return False
        self.publish()
        return True

    def _remote_failed(self, error: str, report: bool) -> None:
        """The remote is unreachable: status, next attempt, and maybe the repository's errors."""
        self.link.lost(self.schedule.frequency if self.schedule else None)
        self._error(error)
        if report:
            self._report(f"Error connecting to remote server {self.srvid}: {error}")

    def _report(self, error: str) -> None:
        """Store a failure in powa_snapshot_metas.errors, where powa-web shows it."""
        try:
            repository.report_failure(
                self.cfg.repository.dsn, self.srvid, error, self.cfg.repository.connect_timeout
            )
        except RepositoryUnavailable as exc:
            self._repository_failed(str(exc))
            return
        except psycopg.Error as exc:
            log.warning("could not store the error in the repository: %s", logs.one_line(exc))
            return
        if self.state.repository_down:
            self.state.repository_down = False
            self.publish()

    def _repository_failed(self, error: str) -> None:
        self.state.repository_down = True
        self._error(error)

    def _error(self, error: str) -> None:
        self.reporter.error(error)
        self.publish()

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, forced: bool) -> SnapshotResult | None:
        assert self.schedule is not None
        self.schedule.started(self.gate.begin(), forced)
        self.publish()
        result = None
        try:
            result = self._attempt()
        finally:
            self.gate.end()
            self.watchdog.disarm()
            self.reporter.snapshot(result, self.current_status())
        return result

    def _attempt(self) -> SnapshotResult | None:
        assert self.state.server is not None and self.link.session is not None
        # the loop just tried and is backing off: do not try twice in one cycle
        ready = self.link.connected or (self.link.due(time.monotonic())
                                        and self._connect_remote())
        if ready and (lost := self.link.versions_current()) is not None:
            self._remote_failed(lost, report=False)
            ready = False
        if not ready:
            self._report(f"Error connecting to remote server {self.srvid}: "
                         f"{self.state.last_error}")
            return None
        try:
            return self._store(self.state.server.frequency)
        except RemoteUnavailable as exc:
            self._remote_failed(f"snapshot failed, remote server lost: {exc}", report=True)
        except RepositoryUnavailable as exc:
            self._repository_failed(f"snapshot failed: {exc}")
        except (SnapshotAborted, ConcurrentSnapshotError) as exc:
            self._snapshot_error(exc, repository_lost=False)
        return None

    def _store(self, frequency: int) -> SnapshotResult | None:
        """One snapshot in one repository session (raises what the caller reports)."""
        assert self.link.session is not None
        self.watchdog.arm(self.link.session,
                          time.monotonic() + max(10 * frequency, REPOSITORY_BUDGET))
        with repository.session(
            self.cfg.repository.dsn, f"worker {self.srvid}", self.cfg.repository.connect_timeout,
        ) as repo:
            self.watchdog.watch_repository(repo)
            snapshot = Snapshot(repo, self.link.session, self.srvid, budget=frequency,
                                guard=self.watchdog, clear_stale=self.state.snapshots_ok == 0)
            try:
                result = snapshot.run()
            except psycopg.Error as exc:
                self._snapshot_error(exc, repository_lost=repo.broken)
                return None
        self.state.repository_down = False
        return result

    def _snapshot_error(self, exc: Exception, repository_lost: bool) -> None:
        reason = logs.one_line(exc)
        if self.flags.stop:
            self._error(f"snapshot cancelled and rolled back on stop: {reason}")
        elif repository_lost:
            self._repository_failed(f"snapshot failed and rolled back: {reason}")
        elif isinstance(exc, ConcurrentSnapshotError | SnapshotAborted):
            self._error(f"snapshot skipped: {reason}")
        else:
            self._error(f"snapshot failed and rolled back: {reason}")

    # ------------------------------------------------------------------ commands, status
    def handle_command(self, command: str) -> tuple[str, str]:
        """Answer a control request (runs in the command thread)."""
        if command != "force_snapshot":
            return "UNKNOWN", f"unknown worker command {command[:40]!r}"
        refused = self.gate.request()
        if refused is not None:
            return "ERROR", refused
        self.wakeup.notify()
        # like upstream: wait a moment to tell whether it already began
        if self.gate.wait_started(0.1):
            return "OK", "Snapshot in progress"
        return "OK", "Snapshot will begin shortly"

    def current_status(self) -> str:
        if self.flags.stop:
            return STATUS_STOPPING
        if self.state.repository_down:
            return STATUS_NO_REPOSITORY
        if not self.link.connected:
            return STATUS_NO_REMOTE if self.state.server is not None else STATUS_NO_REPOSITORY
        return STATUS_RUNNING

    def publish(self) -> None:
        self.reporter.publish(self.current_status())

    def _notice_stop(self) -> None:
        """Called by the watchdog thread as soon as a stop is requested."""
        self.reporter.quick(STATUS_STOPPING)

    # ------------------------------------------------------------------ --once
    def _run_once(self) -> int:
        """One snapshot, no status publishing (a running worker owns the status key)."""
        name = program_name(self.srvid)
        try:
            self._read_server()
        except RepositoryUnavailable as exc:
            print(f"{name}: {STATUS_NO_REPOSITORY}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        self.watchdog.start()
        result = self._snapshot(forced=True)
        if result is None or result.outcome == "failed":
            print(f"{name}: {self.state.last_error or 'snapshot failed'}", file=sys.stderr)
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
