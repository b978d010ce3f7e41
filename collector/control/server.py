"""The control process: PoWA's LISTEN/NOTIFY protocol, bridged to Redis and supervisord.

    python -m collector.control -c CFG

Keeps one autocommit connection to the repository, LISTENs on
``powa_collector`` and answers like upstream powa-collector, so powa-web's
collector page and its "Reload collector" button work unchanged:

* ``WORKERS_STATUS [srvid]``: from supervisord's process states and the
  workers' status in Redis (see collector.board);
* ``RELOAD`` (and SIGHUP): regenerate the program files, apply them to
  supervisord, SIGHUP the workers whose ``powa_servers`` row changed (and
  those not ``running``, so they retry at once, as upstream does); done in a
  thread of its own (collector.control.reload), so that the loop goes on
  answering while hundreds of programs stop or start;
* ``FORCE_SNAPSHOT srvid``: asked to the worker itself through Redis;
* ``REFRESH_DB_CAT``: queued by the worker for its next snapshot (PoWA 5; refused
  on PoWA 4, which has no catalogs).

Only backends whose role may signal other backends get an answer other than
``ERROR Permission denied``.  Every field of a request is untrusted: the
response channel only ever becomes a quoted identifier, and no request stops
the loop.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from collector import config, counters, daemon, logs, repository
from collector.backoff import Backoff
from collector.control import protocol
from collector.control.admission import Admission, Incoming, permission
from collector.control.board import StatusBoard
from collector.control.commands import WORKER_REPLY_TIMEOUT, Commands
from collector.control.exclusive import Exclusive
from collector.control.hostkeeper import HostKeeper
from collector.control.leases import Leases
from collector.control.liveboard import LiveBoard
from collector.control.protocol import Request
from collector.control.reload import Reloader
from collector.errors import EXIT_OK, FleetError, ProtocolError
from collector.keys import (
    client,
)
from collector.pg import Conn, PowaExtension
from collector.wakeup import SignalFlags, Wakeup

log = logging.getLogger("collector.control")

#: the repository connection is checked this often when no notification comes
HEALTH_CHECK = 10.0
#: at its start, the control waits this long at most for its live board (the event
#: listener's picture of supervisord) before it listens: while supervisord starts
#: everything, an answer read from supervisord directly would take seconds
LIVE_WAIT = 10.0
#: the control stops within this (a reload under way is left to supervisord); the
#: generated stopwaitsecs (collector.fleet.files.CONTROL_STOPWAIT) is above it
STOP_GRACE = 5.0



class Control:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.wakeup = Wakeup()
        self.flags = SignalFlags(self.wakeup)
        self.conn: Conn | None = None
        self.powa: PowaExtension | None = None
        self.board = StatusBoard(cfg)
        self.live = LiveBoard(self.board)
        self.redis = client(cfg.redis.url, socket_timeout=WORKER_REPLY_TIMEOUT + 2)
        self.reloader = Reloader(cfg, self.board, self.wakeup.notify)
        self.exclusive = Exclusive(cfg, self.redis)
        self.leases = Leases(cfg)
        self.reloader.on_owned = self.leases.want
        #: the repository backend holding the leader's lock, while this control leads
        self.backend_pid: int | None = None
        self.hostkeeper = HostKeeper(cfg, self.reloader, self.leases, self.leader_facts)
        self.admission = Admission(self.allowed)
        self.backoff = Backoff(initial=0.5, maximum=30.0)
        self.lost_at: float | None = None
        self.last_check = 0.0
        self.commands = Commands(cfg, self.board, self.live, self.redis, lambda: self.powa,
                                 others=lambda: self.reloader.others)
        self.handlers: dict[str, Callable[[Request], tuple[str, str] | None]] = {
            "RELOAD": self.do_reload,
            "WORKERS_STATUS": self.commands.workers_status,
            "FORCE_SNAPSHOT": self.commands.force_snapshot,
            "REFRESH_DB_CAT": self.commands.refresh_db_cat,
        }

    # ------------------------------------------------------------------ life cycle
    def run(self) -> int:
        self.flags.install()
        log.info("starting")
        self.live.start()
        self.reloader.start()
        self.hostkeeper.start()
        started = time.monotonic()
        if not self.live.wait_whole(LIVE_WAIT, lambda: self.flags.stop):
            if not self.flags.stop:
                log.warning("the event listener has not published supervisord's programs after"
                            " %.0f s: answering from supervisord directly meanwhile", LIVE_WAIT)
        else:
            log.info("live status board whole after %.1f s", time.monotonic() - started)
        try:
            while not self.flags.stop:
                self._cycle()
        finally:
            self.shutdown()
        return EXIT_OK

    def _cycle(self) -> None:
        if self.conn is None and not self._connect():
            delay = self.backoff.next_delay()
            if self.exclusive.leader is not None:
                # following: ready to lead within a heartbeat of the leader's loss
                delay = min(delay, float(self.cfg.fleet.heartbeat))
            self.wakeup.wait(delay)
            return
        if self.flags.reload:
            self.flags.reload = False
            log.info("SIGHUP: reloading")
            self.reloader.request(None)
        try:
            self._serve()
        except psycopg.Error as exc:
            self._lost(exc)

    def _serve(self) -> None:
        assert self.conn is not None
        # requests that came in while our own statements ran (a SIGHUP reload, the
        # LISTEN of a new connection, the health check) are already off the socket
        self._drain()
        ready = self.wakeup.wait(HEALTH_CHECK, [self.conn.fileno()])
        if self.flags.stop:
            return
        self._send_reload_answers()
        if not ready and time.monotonic() - self.last_check >= HEALTH_CHECK:
            self.conn.execute("SELECT 1")
            self.last_check = time.monotonic()
        self._drain()

    def _drain(self) -> None:
        """Serve every notification received, including those that arrived while answering.

        Notifications that come in while the connection runs our own statements
        are read off the socket by libpq and wait in psycopg's backlog: the
        socket will not turn readable for them, so look again until none is left.
        """
        assert self.conn is not None
        while not self.flags.stop:
            own = self.conn.info.backend_pid
            # our own NOTIFYs are never requests, whatever they say
            batch = [Incoming(n.pid, n.payload) for n in self.conn.notifies(timeout=0)
                     if n.pid != own]
            if not batch:
                return
            privileged, refused = self.admission.sort(batch)
            for item in privileged:
                self.handle(item.payload, item.pid, allowed=True)
            for item in refused:
                if self.admission.answer_refusal(item.pid):
                    self.handle(item.payload, item.pid, allowed=False)

    def _connect(self) -> bool:
        conn = None
        try:
            # upstream's lock_timeout too: a lock held on powa_servers fails a
            # reload instead of freezing the protocol
            conn = repository.connect(self.cfg.repository.dsn, "control",
                                      self.cfg.repository.connect_timeout)
            conn.autocommit = True
            self.powa = repository.require_powa(conn)
            if self.exclusive.refusal(conn) is not None:
                conn.close()
                return False
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(protocol.CHANNEL)))
        except (psycopg.Error, FleetError) as exc:
            if conn is not None:
                conn.close()
            if self.lost_at is None:
                self.lost_at = time.monotonic()
            log.error("not listening on %s: %s", protocol.CHANNEL, logs.one_line(exc))
            return False
        self.conn = conn
        self.backend_pid = conn.info.backend_pid
        self.backoff.reset()
        self.last_check = time.monotonic()
        if self.lost_at is not None:
            log.warning(
                "listening again on %s after %.1fs without connection: notifications sent"
                " meanwhile are lost", protocol.CHANNEL, time.monotonic() - self.lost_at,
            )
            self.lost_at = None
        else:
            log.info("listening on %s", protocol.CHANNEL)
        return True

    def _lost(self, exc: Exception) -> None:
        log.error("repository connection lost: %s", logs.one_line(exc))
        self.lost_at = time.monotonic()
        self.backend_pid = None
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                log.debug("closing a broken connection failed", exc_info=True)
        self.conn = None

    def shutdown(self) -> None:
        daemon.teardown(log, [
            # leaving first: the other hosts take this one's servers at once
            ("hosts", self.hostkeeper.close),
            ("reload", lambda: self.reloader.close(STOP_GRACE)),
            ("repository", lambda: self.conn.close() if self.conn else None),
            ("board", self.board.close),
            ("live board", self.live.close),
            ("redis", self.redis.close),
            ("signals", self.flags.uninstall),
            ("wakeup", self.wakeup.close),
        ])

    # ------------------------------------------------------------------ requests
    def handle(self, payload: str, pid: int, allowed: bool) -> None:
        """Serve one notification; nothing a request holds can stop the loop."""
        assert self.conn is not None
        started = time.monotonic()
        request = protocol.parse(payload, pid)
        problem = protocol.channel_problem(request.channel)
        if problem:
            log.warning("request from pid %d refused, %s: %r", pid, problem, payload[:200])
            counters.record_request(self.cfg.redis, request.command, ("REFUSED", problem),
                                    time.monotonic() - started)
            return
        log.debug("request from pid %d: %r", pid, payload[:200])
        try:
            outcome = self.dispatch(request) if allowed else ("ERROR", "Permission denied")
        except Exception as exc:
            if self._broken():
                raise
            log.exception("request %r failed", request.command[:40])
            outcome = "ERROR", logs.one_line(exc)
        # None: answered later (a reload under way)
        if outcome is not None and request.answers:
            self.answer(request.channel, request.command, *outcome)
        counters.record_request(self.cfg.redis, request.command, outcome,
                                time.monotonic() - started)

    def answer(self, channel: str, command: str, status: str, data: str) -> None:
        try:
            self.notify(channel, protocol.answer(command, status, data))
        except psycopg.Error as exc:
            if self._broken():
                raise
            log.warning("cannot answer on channel %r: %s", channel, logs.one_line(exc))

    def _send_reload_answers(self) -> None:
        """Answers of reloads the reload thread finished (or that waited long enough)."""
        while not self.reloader.outbox.empty():
            channel, status, data = self.reloader.outbox.get_nowait()
            self.answer(channel, "RELOAD", status, data)

    def _broken(self) -> bool:
        return self.conn is None or self.conn.closed or self.conn.broken

    def do_reload(self, request: Request) -> None:
        """Queued for the reload thread; a burst of RELOADs is served by one reload.

        The other hosts of the fleet reload too (collector.control.hostkeeper).
        """
        self.reloader.request(request.channel if request.answers else None)
        self.hostkeeper.bump()

    def leader_facts(self) -> dict[str, Any]:
        """What this host's heartbeat says of its control (read by the host keeper)."""
        pid = self.backend_pid
        return {"leader": pid is not None, "backend_pid": pid}

    def dispatch(self, request: Request) -> tuple[str, str] | None:
        handler = self.handlers.get(request.command)
        if handler is None:
            return "UNKNOWN", f'Message "{request.command[:100]}" invalid, command ignored'
        try:
            return handler(request)
        except (ProtocolError, FleetError) as exc:
            # the reason quotes request fields: one line, or they could forge log lines
            reason = logs.one_line(exc)
            log.warning("%s refused: %s", request.command, reason)
            return "ERROR", reason

    def allowed(self, pid: int) -> bool | None:
        assert self.conn is not None and self.powa is not None
        return permission(self.conn, self.powa, pid)

    def notify(self, channel: str, payload: str) -> None:
        assert self.conn is not None
        self.conn.execute(
            sql.SQL("NOTIFY {}, {}").format(sql.Identifier(channel), sql.Literal(payload))
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m collector.control",
        description="Answer PoWA's collector protocol for a powa-fleet.",
    )
    daemon.config_argument(parser)
    args = parser.parse_args(argv)
    return Control(daemon.load_config("control", args.config)).run()


if __name__ == "__main__":
    sys.exit(main())
