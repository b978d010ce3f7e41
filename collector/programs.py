"""supervisord event listener: the state of every program of the fleet, pushed to Redis.

    python -m collector.programs -c CFG      (run by supervisord as [eventlistener:programs])

supervisord tells it each PROCESS_STATE change (and a TICK_5 every five
seconds); it keeps ``<prefix>:programs``, a hash ``program name -> {"state",
"pid", "since"}``, and publishes each change on the channel of the same name.
The control process follows that channel, so it can answer WORKERS_STATUS for
a whole fleet without polling supervisord.  ``<prefix>:programs:alive`` is
refreshed on every tick: when it expires, readers fall back to asking
supervisord themselves.

Redis being away never blocks supervisord: every event is acknowledged at
once, the latest state of each program is kept, and written when Redis is back.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, TextIO

import redis
import simplejson as json
from supervisor import childutils

from collector import config, daemon, logs
from collector.errors import EXIT_OK, SupervisorError
from collector.status import client
from collector.supervisord import Supervisor

log = logging.getLogger("collector.programs")

#: a reader considers the table current while this key lives
ALIVE_TTL = 20


def programs_key(prefix: str) -> str:
    return f"{prefix}:programs"


def alive_key(prefix: str) -> str:
    return f"{prefix}:programs:alive"


def state_from_event(event: str, headers: dict[str, str]) -> tuple[str, dict[str, Any]] | None:
    """(program name, state) of a PROCESS_STATE event; None for any other event."""
    if not event.startswith("PROCESS_STATE_"):
        return None
    name = headers.get("processname", "")
    group = headers.get("groupname", name)
    # programs of our fleet are groups of one process: the group name is the program
    if not name:
        return None
    pid = int(headers["pid"]) if headers.get("pid", "").isdigit() else 0
    return group, {"state": event.removeprefix("PROCESS_STATE_"), "pid": pid,
                   "since": round(time.time(), 3)}


class Table:
    """The programs' states, mirrored to Redis whenever Redis answers."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.redis = client(cfg.redis.url, socket_timeout=1.0)
        self.key = programs_key(cfg.redis.prefix)
        self.alive = alive_key(cfg.redis.prefix)
        self.pending: dict[str, dict[str, Any]] = {}
        self.reseed = True
        self.failing = False

    def seed(self) -> None:
        """The whole table from supervisord (at start, and after Redis came back)."""
        try:
            processes = Supervisor(self.cfg.supervisor_socket, timeout=30).all_processes()
        except SupervisorError as exc:
            log.warning("cannot read the process table yet: %s", exc)
            return
        now = round(time.time(), 3)
        self.pending = {
            name: {"state": str(info["statename"]), "pid": int(info["pid"] or 0),
                   "since": float(info.get("start") or now)}
            for name, info in processes.items()
        }
        self.reseed = False
        self.flush(replace=True)

    def tick(self) -> None:
        """Every five seconds: readers learn the table is kept current."""
        self.flush()
        if not self.failing:
            try:
                self.redis.publish(self.key, json.dumps({"tick": round(time.time(), 3)}))
            except redis.RedisError:
                self.reseed = True

    def update(self, name: str, state: dict[str, Any]) -> None:
        self.pending[name] = state
        self.flush()

    def flush(self, replace: bool = False) -> None:
        """Write what changed; on a Redis failure keep it for the next try."""
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                if replace:
                    pipe.delete(self.key)
                for name, state in self.pending.items():
                    text = json.dumps(state)
                    pipe.hset(self.key, name, text)
                    pipe.publish(self.key, json.dumps({"name": name, **state}))
                pipe.set(self.alive, "1", ex=ALIVE_TTL)
                pipe.execute()
        except redis.RedisError as exc:
            if not self.failing:
                log.warning("cannot write program states to Redis (will keep trying): %s",
                            logs.one_line(exc))
                self.failing = True
            # what happened meanwhile may be lost on the channel: write the whole table later
            self.reseed = True
            return
        if self.failing:
            log.info("writing program states to Redis again")
            self.failing = False
        self.pending = {}


def serve(table: Table, stdin: TextIO, stdout: TextIO) -> None:
    """The eventlistener protocol loop: every event is acknowledged at once."""
    table.seed()
    while True:
        try:
            headers, payload = childutils.listener.wait(stdin, stdout)
        except (KeyError, ValueError):
            # end of input: supervisord is gone
            return
        try:
            event = headers.get("eventname", "")
            if table.reseed:
                table.seed()
            found = state_from_event(event, childutils.get_headers(payload.split("\n", 1)[0]))
            if found is not None:
                table.update(*found)
            elif event.startswith("TICK"):
                table.tick()
        except Exception:
            log.exception("event %r not handled", headers.get("eventname"))
        childutils.listener.ok(stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.programs",
                                     description="supervisord event listener of a powa-fleet")
    daemon.config_argument(parser)
    args = parser.parse_args(argv)
    # stdout belongs to the eventlistener protocol: logs go to stderr
    serve(Table(daemon.load_config("programs", args.config)), sys.stdin, sys.stdout)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
