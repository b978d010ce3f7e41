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
import contextlib
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from collector import __version__, config, daemon, logs, repository
from collector.commands import CommandListener
from collector.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    ConcurrentSnapshotError,
    FleetError,
    RemoteUnavailable,
    RepositoryUnavailable,
    ServerDisabledError,
    UnknownServerError,
)
from collector.plugins import Dispatcher, NullDispatcher, load_dispatcher
from collector.remote import RemoteSession
from collector.repository import Server
from collector.schedule import Backoff, Schedule
from collector.snapshot import Snapshot, SnapshotAborted, SnapshotResult
from collector.status import (
    STATUS_NO_REMOTE,
    STATUS_NO_REPOSITORY,
    STATUS_RUNNING,
    STATUS_STOPPED,
    STATUS_STOPPING,
    StatusPublisher,
    iso,
)
from collector.wakeup import SignalFlags, Wakeup
from collector.watchdog import Watchdog

log = logging.getLogger("collector.worker")

#: FORCE_SNAPSHOT is refused when the last snapshot started less than this ago (upstream)
FORCE_MIN_INTERVAL = 10.0
#: the repository part of a snapshot gets this long (or ten periods) before it is cancelled:
#: a big aggregation may take long, a repository that never answers must not stall a worker
REPOSITORY_BUDGET = 600.0
#: the remote's PostgreSQL and extension versions are read again this often (seconds)
VERSIONS_EVERY = 3600.0
#: the main loop wakes at least this often, even with nothing to do (signals,
#: commands and a dying remote connection wake it at once anyway)
MAX_SLEEP = 60.0


class Worker:
    """One server's collector; ``run()`` returns the process exit code."""

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
        self.events: Dispatcher = events or NullDispatcher()
        self.rng = rng or random.Random()
        self.wakeup = Wakeup()
        self.flags = SignalFlags(self.wakeup)
        self.server: Server | None = None
        self.remote: RemoteSession | None = None
        self.schedule: Schedule | None = None
        self.reconnect = Backoff(maximum=60.0, rng=self.rng)
        self.next_reconnect = 0.0
        self.repository_down = False
        #: a SIGHUP that could not read the row yet is tried again then
        self.reload_retry_at: float | None = None
        self.reload_backoff = Backoff(maximum=30.0, rng=self.rng)
        self.publisher: StatusPublisher | None = None
        self.commands: CommandListener | None = None
        self.watchdog = Watchdog(self.flags, cfg.collector.stop_grace, self._notice_stop)
        # shared with the command thread
        self._lock = threading.Lock()
        self.in_progress = False
        self.force_pending = False
        self.last_start_mono: float | None = None
        self.started_event = threading.Event()
        # reported in the status document
        self.started_at = time.time()
        self.last_result: SnapshotResult | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.snapshots_ok = 0
        self.snapshots_failed = 0
        self.consecutive_failures = 0
        self.last_status: str | None = None

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
                print(f"worker_{self.srvid}: {exc}", file=sys.stderr)
            else:
                log.error("%s: exiting, supervisord will not restart this worker", exc)
            return exc.exit_code
        finally:
            self.shutdown()

    def _start_threads(self) -> None:
        self.publisher = StatusPublisher(
            self.cfg.redis.url, self.cfg.redis.prefix, self.srvid, self.cfg.redis.status_ttl
        )
        self.publisher.start()
        self.commands = CommandListener(
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
        self.repository_down = False
        now = time.monotonic()
        previous, self.server = self.server, server
        log.info("collecting %s every %ss", server.describe(self.cfg.collector.use_server_alias),
                 server.frequency)
        if self.schedule is None:
            last = snapts.timestamp() if snapts is not None else None
            self.schedule = Schedule.resume(server.frequency, last, time.time(), now, self.rng)
        else:
            self.schedule.change_frequency(server.frequency, now)
        if previous is None or _connection_changed(previous, server):
            if self.remote is not None:
                self.remote.close()
            self.remote = RemoteSession(server, self.cfg.collector.connect_timeout)
            self.next_reconnect = now
            self.reconnect.reset()
        elif self.remote is not None and self.remote.connected:
            # like upstream's reload: versions are checked again
            try:
                with self._remote_deadline():
                    self.remote.refresh_versions()
            except psycopg.Error:
                self.remote.close()
        else:
            # like upstream's reload: a worker that lost its remote retries at once
            self.next_reconnect = now
            self.reconnect.reset()

    def shutdown(self) -> None:
        """Tear everything down, each step on its own."""
        daemon.teardown(log, [
            ("remote connection", lambda: self.remote.close() if self.remote else None),
            ("watchdog", self.watchdog.close),
            ("commands", lambda: self.commands.close() if self.commands else None),
            ("status", self._final_status),
            ("plugins", self.events.close),
            ("signals", self.flags.uninstall),
            ("wakeup", self.wakeup.close),
        ])

    def _final_status(self) -> None:
        if self.server is not None and not self.once:
            # plugins hear of the stop (they are closed after this step)
            self.publish(STATUS_STOPPED)
        if self.publisher is not None:
            self.publisher.close(self.status_document(STATUS_STOPPED))

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
        assert self.schedule is not None and self.remote is not None
        now = time.monotonic()
        if self.flags.reload or (self.reload_retry_at is not None and now >= self.reload_retry_at):
            self.flags.reload = False
            self._reload()
            now = time.monotonic()
        if not self.remote.connected and now >= self.next_reconnect:
            self._connect_remote()
        with self._lock:
            forced = self.force_pending
        if not self.flags.stop and (forced or self.schedule.due(time.monotonic())):
            self._snapshot(forced)
        self._sleep()

    def _sleep(self) -> None:
        assert self.schedule is not None and self.remote is not None
        until = self.schedule.next_due
        if not self.remote.connected:
            until = min(until, self.next_reconnect)
        if self.reload_retry_at is not None:
            until = min(until, self.reload_retry_at)
        timeout = min(until - time.monotonic(), MAX_SLEEP)
        if self.flags.stop or self.flags.reload or timeout <= 0:
            return
        remote_fd = self.remote.fileno()
        ready = self.wakeup.wait(timeout, [remote_fd] if remote_fd is not None else [])
        if ready and not self.remote.check_alive():
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

    # ------------------------------------------------------------------ remote
    @contextlib.contextmanager
    def _remote_deadline(self) -> Iterator[None]:
        """Remote statements outside a snapshot (connection set-up, versions) end in time.

        The watchdog cancels them past the deadline, and drops the connection of
        a frozen backend, as it does for a snapshot's source queries.
        """
        assert self.remote is not None
        now = time.monotonic()
        self.watchdog.arm(self.remote, now + REPOSITORY_BUDGET)
        self.watchdog.remote_begin(now + 2 * self.cfg.collector.connect_timeout)
        try:
            yield
        finally:
            self.watchdog.remote_end()
            self.watchdog.disarm()

    def _connect_remote(self) -> bool:
        assert self.remote is not None
        try:
            with self._remote_deadline():
                self.remote.connect()
        except RemoteUnavailable as exc:
            self._remote_failed(f"cannot connect to the remote server: {exc}", report=False)
            return False
        if self.reconnect.active:
            log.info("connected to the remote server again")
        self.reconnect.reset()
        self.publish()
        return True

    def _remote_failed(self, error: str, report: bool) -> None:
        """The remote is unreachable: status, next attempt, and maybe the repository's errors."""
        assert self.remote is not None
        self.remote.close()
        delay = self.reconnect.next_delay()
        if self.schedule is not None:
            delay = min(delay, self.schedule.frequency)
        self.next_reconnect = time.monotonic() + delay
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
        if self.repository_down:
            self.repository_down = False
            self.publish()

    def _repository_failed(self, error: str) -> None:
        self.repository_down = True
        self._error(error)

    def _error(self, error: str, publish: bool = True) -> None:
        error = logs.one_line(error)
        if error != self.last_error:
            log.error("%s", error)
        self.last_error, self.last_error_at = error, time.time()
        if publish:
            self.publish()

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self, forced: bool) -> SnapshotResult | None:
        assert self.schedule is not None and self.remote is not None
        now = time.monotonic()
        with self._lock:
            self.in_progress, self.force_pending = True, False
            self.last_start_mono = now
        self.started_event.set()
        self.schedule.started(now, forced)
        self.publish()
        result = None
        try:
            result = self._attempt(forced)
        finally:
            with self._lock:
                self.in_progress = False
            self.watchdog.disarm()
            self._account(result)
        return result

    def _attempt(self, forced: bool) -> SnapshotResult | None:
        assert self.remote is not None and self.server is not None
        # the loop just tried and is backing off: do not try twice in one cycle
        ready = self.remote.connected or (
            time.monotonic() >= self.next_reconnect and self._connect_remote()
        )
        if not ready or not self._versions_current():
            self._report(f"Error connecting to remote server {self.srvid}: {self.last_error}")
            return None
        frequency = self.server.frequency
        self.watchdog.arm(self.remote, time.monotonic() + max(10 * frequency, REPOSITORY_BUDGET))
        try:
            with repository.session(
                self.cfg.repository.dsn, f"worker {self.srvid}",
                self.cfg.repository.connect_timeout,
            ) as repo:
                self.watchdog.watch_repository(repo)
                snapshot = Snapshot(repo, self.remote, self.srvid, budget=frequency,
                                    guard=self.watchdog, clear_stale=self.snapshots_ok == 0)
                try:
                    result = snapshot.run()
                except psycopg.Error as exc:
                    self._snapshot_error(exc, repository_lost=repo.broken)
                    return None
        except RemoteUnavailable as exc:
            self._remote_failed(f"snapshot failed, remote server lost: {exc}", report=True)
            return None
        except RepositoryUnavailable as exc:
            self._repository_failed(f"snapshot failed: {exc}")
            return None
        except (SnapshotAborted, ConcurrentSnapshotError) as exc:
            self._snapshot_error(exc, repository_lost=False)
            return None
        self.repository_down = False
        return result

    def _versions_current(self) -> bool:
        """Read the remote's versions again now and then (extensions get upgraded)."""
        assert self.remote is not None
        if time.monotonic() - self.remote.versions_read_at < VERSIONS_EVERY:
            return True
        try:
            with self._remote_deadline():
                self.remote.refresh_versions()
        except psycopg.Error as exc:
            self._remote_failed(f"remote server lost: {logs.one_line(exc)}", report=False)
            return False
        return True

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

    def _account(self, result: SnapshotResult | None) -> None:
        self.last_result = result
        stored = result is not None and result.outcome != "failed"
        if stored:
            self.snapshots_ok += 1
            self.consecutive_failures = 0
        else:
            self.snapshots_failed += 1
            self.consecutive_failures += 1
        if result is not None:
            if stored and not result.errors:
                self.last_error = None
            for error in result.errors:
                self._error(error, publish=False)
        fields = _result_fields(result) if result is not None else {}
        if stored and result is not None:
            log.info(
                "snapshot of server %d stored in %.3fs (%d rows, %d errors)",
                self.srvid, result.duration, sum(result.rows.values()), result.error_count,
            )
            self.events.emit("snapshot_done", {**self._event_base(), **fields})
        else:
            self.events.emit("snapshot_failed",
                             {**self._event_base(), **fields, "error": self.last_error})
        self.publish()

    # ------------------------------------------------------------------ commands
    def handle_command(self, command: str) -> tuple[str, str]:
        """Answer a control request (runs in the command thread)."""
        if command != "force_snapshot":
            return "UNKNOWN", f"unknown worker command {command[:40]!r}"
        with self._lock:
            if self.in_progress:
                return "ERROR", "A snapshot is already in progress"
            if self.force_pending:
                return "ERROR", "A forced snapshot is already scheduled"
            last = self.last_start_mono
            if last is not None and time.monotonic() - last < FORCE_MIN_INTERVAL:
                return "ERROR", "Last snapshot was less than 10s. ago"
            self.force_pending = True
            self.started_event.clear()
        self.wakeup.notify()
        # like upstream: wait a moment to tell whether it already began
        if self.started_event.wait(0.1):
            return "OK", "Snapshot in progress"
        return "OK", "Snapshot will begin shortly"

    # ------------------------------------------------------------------ status
    def current_status(self) -> str:
        if self.flags.stop:
            return STATUS_STOPPING
        if self.repository_down:
            return STATUS_NO_REPOSITORY
        if self.remote is None or not self.remote.connected:
            return STATUS_NO_REMOTE if self.server is not None else STATUS_NO_REPOSITORY
        return STATUS_RUNNING

    def status_document(self, status: str | None = None) -> dict[str, Any]:
        result = self.last_result
        schedule = self.schedule
        now_mono, now_wall = time.monotonic(), time.time()
        with self._lock:
            in_progress, force_pending = self.in_progress, self.force_pending
            last_start = self.last_start_mono
        return {
            "srvid": self.srvid,
            "program": f"worker_{self.srvid}",
            "alias": self.server.alias if self.server else None,
            "status": status or self.current_status(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "version": __version__,
            "frequency": self.server.frequency if self.server else None,
            "snapshot_in_progress": in_progress,
            "force_pending": force_pending,
            "last_snapshot_start": iso(
                now_wall - (now_mono - last_start) if last_start is not None else None
            ),
            "last_snapshot_duration": round(result.duration, 3) if result else None,
            "last_snapshot_outcome": (result.outcome if result else
                                      ("failed" if last_start is not None else None)),
            "last_snapshot_rows": sum(result.rows.values()) if result else None,
            "last_error": self.last_error,
            "last_error_at": iso(self.last_error_at),
            "snapshots_ok": self.snapshots_ok,
            "snapshots_failed": self.snapshots_failed,
            "next_snapshot_due": iso(
                now_wall + max(0.0, schedule.next_due - now_mono) if schedule else None
            ),
            "started_at": iso(self.started_at),
        }

    def _notice_stop(self) -> None:
        """Called by the watchdog thread as soon as a stop is requested."""
        if self.publisher is not None:
            self.publisher.update(self.status_document(STATUS_STOPPING))

    def publish(self, status: str | None = None) -> None:
        """Tell Redis (and the plugins, on a change) the current status."""
        status = status or self.current_status()
        if status != self.last_status:
            if self.last_status is not None:
                log.info("status: %s -> %s", self.last_status, status)
                self.events.emit("status_changed", {
                    **self._event_base(), "status": status, "previous_status": self.last_status,
                })
            self.last_status = status
        if self.publisher is not None:
            self.publisher.update(self.status_document(status))

    def _event_base(self) -> dict[str, Any]:
        return {
            "srvid": self.srvid,
            "alias": self.server.alias if self.server else None,
            "status": self.current_status(),
            "host": socket.gethostname(),
            "time": iso(time.time()),
            "snapshots_ok": self.snapshots_ok,
            "snapshots_failed": self.snapshots_failed,
            "consecutive_failures": self.consecutive_failures,
        }

    # ------------------------------------------------------------------ --once
    def _run_once(self) -> int:
        """One snapshot, no status publishing (a running worker owns the status key)."""
        try:
            self._read_server()
        except RepositoryUnavailable as exc:
            print(f"worker_{self.srvid}: {STATUS_NO_REPOSITORY}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        self.watchdog.start()
        result = self._snapshot(forced=True)
        if result is None or result.outcome == "failed":
            reason = self.last_error or "snapshot failed"
            print(f"worker_{self.srvid}: {reason}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"worker_{self.srvid}: snapshot stored in {result.duration:.3f}s, "
              f"{sum(result.rows.values())} rows, {result.error_count} error(s)")
        for error in result.errors:
            print(f"worker_{self.srvid}: {error}")
        return EXIT_OK


def _connection_changed(old: Server, new: Server) -> bool:
    return (old.hostname, old.port, old.username, old.password, old.dbname) != (
        new.hostname, new.port, new.username, new.password, new.dbname
    )


def _result_fields(result: SnapshotResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome,
        "duration": round(result.duration, 3),
        "rows": dict(result.rows),
        "errors": list(result.errors),
        "take_snapshot_errors": result.take_snapshot_errors,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }


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
    program = f"worker_{args.srvid}"
    quiet = args.once and not args.verbose
    cfg = daemon.load_config(program, args.config, "critical" if quiet else None)
    try:
        events = load_dispatcher(cfg, args.srvid)
    except FleetError as exc:
        for line in str(exc).splitlines():
            print(f"{program}: {line}", file=sys.stderr)
        return daemon.settle(exc.exit_code)
    return daemon.settle(Worker(cfg, args.srvid, once=args.once, events=events).run())


if __name__ == "__main__":
    sys.exit(main())
