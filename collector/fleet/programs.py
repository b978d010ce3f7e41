"""supervisord event listener: the state of every program of the fleet, pushed to Redis.

    python -m collector.fleet.programs -c CFG      (run by supervisord as [eventlistener:programs])

supervisord tells it each PROCESS_STATE change, each group removed by an
update (PROCESS_GROUP) and a TICK_5 every five seconds; it keeps
``<prefix>:programs``, a hash ``program name -> {"state", "pid", "since"}``,
and publishes each change on the channel of the same name (``{"name": ...,
"removed": true}`` for a program supervisord no longer has).  Every minute,
and after Redis comes back, the table is read again from supervisord: an
event lost on the way (a full buffer) is never wrong for long.
The control process follows that channel, so it can answer WORKERS_STATUS for
a whole fleet without polling supervisord.  ``<prefix>:programs:alive`` is
refreshed on every tick: when it expires, readers fall back to asking
supervisord themselves.

Redis being away never blocks supervisord: every event is acknowledged at
once, the latest state of each program is kept, and written when Redis is back
(tried on each tick, not on each event: a hung Redis costs its timeout once
per tick, not once per event of a fleet starting).
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
import time
from typing import Any, TextIO

import simplejson as json
from supervisor import childutils

from collector import config, daemon, logs
from collector.errors import EXIT_OK, SupervisorError
from collector.fleet.starter import Starter, default_rate
from collector.fleet.supervisord import Supervisor
from collector.keys import ALIVE_TTL, alive_key, client, programs_key
from collector.syncredis import redis

log = logging.getLogger("collector.fleet.programs")

#: the table outlives its listener this long (it is refreshed on every tick)
TABLE_TTL = 300
#: the table is read again from supervisord every this many ticks (of 5 s)
RESYNC_TICKS = 12
#: a read of supervisord's table gives up after this (it runs beside the events)
SEED_TIMEOUT = 60.0


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
    """The programs' states, mirrored to Redis whenever Redis answers.

    The whole table is kept here: after a Redis failure it is written again
    from memory, without asking supervisord (which, with a whole fleet
    starting, would be asked once per event).
    """

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.redis = client(cfg.redis.url, socket_timeout=1.0)
        self.key = programs_key(cfg.redis.prefix, cfg.fleet.host)
        self.alive = alive_key(cfg.redis.prefix, cfg.fleet.host)
        self.states: dict[str, dict[str, Any]] = {}
        self.changed: set[str] = set()
        self.removed: set[str] = set()
        #: the hash in Redis may miss changes: write it whole at the next flush
        self.rewrite = True
        self.seeded = False
        self.failing = False
        self.ticks = 0
        #: a read of supervisord's table is under way; its answer (None: failed)
        self.reading = False
        self.answers: queue.SimpleQueue[dict[str, dict[str, Any]] | None] = queue.SimpleQueue()
        #: programs an event spoke of since that read was asked
        self.touched: set[str] = set()

    def request_seed(self) -> None:
        """Ask supervisord for its whole table, in a thread: events never wait on it.

        While supervisord starts hundreds of programs its XML-RPC answers after
        tens of seconds; meanwhile events go on being acknowledged and written.
        The answer is applied by ``take_seed`` (at the next event or tick).
        """
        if self.reading:
            return
        self.reading = True
        self.touched = set()
        threading.Thread(target=self._read, name="seed", daemon=True).start()

    def _read(self) -> None:
        try:
            processes = Supervisor(self.cfg.supervisor_socket, timeout=SEED_TIMEOUT).all_processes()
        except SupervisorError as exc:
            log.warning("cannot read the process table: %s", exc)
            self.answers.put(None)
            return
        self.answers.put(processes)

    def take_seed(self) -> bool:
        """Apply supervisord's table if it came; True when it did (and was written).

        Events received while the read was under way may be newer than the
        answer or older: their programs keep what the events said, since every
        event supervisord sends comes in order, and the next read checks again.
        """
        try:
            processes = self.answers.get_nowait()
        except queue.Empty:
            return False
        self.reading = False
        if processes is None:
            return False
        now = round(time.time(), 3)
        seeded = {
            name: {"state": str(info["statename"]), "pid": int(info["pid"] or 0),
                   "since": float(info.get("start") or now)}
            for name, info in processes.items()
        }
        for name in self.touched:
            if name in self.states:
                seeded[name] = self.states[name]
            else:
                seeded.pop(name, None)
        if not self.seeded:
            # the first read: what an earlier listener left in Redis goes (see flush)
            self.rewrite = True
        self.removed |= set(self.states) - set(seeded)
        self.changed |= {name for name, state in seeded.items()
                         if self.states.get(name, {}).get("state") != state["state"]
                         or self.states[name].get("pid") != state["pid"]}
        self.states = seeded
        self.seeded = True
        self.flush()
        return True

    def tick(self) -> None:
        """Every five seconds: readers learn the table is kept current."""
        self.ticks += 1
        if not self.seeded or self.ticks % RESYNC_TICKS == 0:
            self.request_seed()
        if not self.take_seed():
            # without supervisord's table, what the events said is still worth writing
            self.flush()
        if not self.failing:
            try:
                self.redis.publish(self.key, json.dumps({"tick": round(time.time(), 3)}))
            except redis.RedisError:
                self.rewrite = True

    def update(self, name: str, state: dict[str, Any]) -> None:
        self.take_seed()
        self.states[name] = state
        self.touched.add(name)
        self.changed.add(name)
        self.removed.discard(name)
        if not self.failing:
            self.flush()

    def remove(self, name: str) -> None:
        """A group supervisord no longer has (removed by an update)."""
        self.take_seed()
        self.touched.add(name)
        if self.states.pop(name, None) is not None:
            self.changed.discard(name)
            self.removed.add(name)
            if not self.failing:
                self.flush()

    def flush(self) -> None:
        """Write what changed (everything after a failure); on failure, keep it for later."""
        names = list(self.states) if self.rewrite else sorted(self.changed)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                # only a table read from supervisord replaces the whole hash: until
                # then, what events said is added to what Redis has
                if self.rewrite and self.seeded:
                    pipe.delete(self.key)
                for name in sorted(self.removed):
                    pipe.hdel(self.key, name)
                    pipe.publish(self.key, json.dumps({"name": name, "removed": True}))
                for name in names:
                    state = self.states[name]
                    pipe.hset(self.key, name, json.dumps(state))
                    pipe.publish(self.key, json.dumps({"name": name, **state}))
                pipe.set(self.alive, "1", ex=ALIVE_TTL)
                # a fleet that is gone leaves nothing behind for long
                pipe.expire(self.key, TABLE_TTL)
                pipe.execute()
        except redis.RedisError as exc:
            if not self.failing:
                log.warning("cannot write program states to Redis (will keep trying): %s",
                            logs.one_line(exc))
                self.failing = True
            # what happened meanwhile may be lost on the channel: write the whole table later
            self.rewrite = True
            return
        if self.failing:
            log.info("writing program states to Redis again")
            self.failing = False
            # events may have been lost meanwhile: ask supervisord at the next tick
            self.seeded = False
        self.changed.clear()
        self.removed.clear()
        self.rewrite = False


def serve(table: Table, stdin: TextIO, stdout: TextIO, starter: Starter | None = None) -> None:
    """The eventlistener protocol loop: every event is acknowledged at once.

    The table is read from supervisord at once, in a thread of its own
    (Table.request_seed): when supervisord is busy starting or stopping
    hundreds of programs its XML-RPC answers late, and meanwhile the events
    alone keep the table (and so the control's answers) current.  The worker
    programs' start (``starter``) begins once that table is written: the
    control then answers from a whole picture while they start.
    """
    table.request_seed()
    waiting = starter
    while True:
        try:
            headers, payload = childutils.listener.wait(stdin, stdout)
        except (KeyError, ValueError):
            # end of input: supervisord is gone
            return
        try:
            event = headers.get("eventname", "")
            body = childutils.get_headers(payload.split("\n", 1)[0])
            # supervisord's table as soon as it came: at its start, 800 PROCESS_GROUP_ADDED
            # events come before any state change or tick
            table.take_seed()
            found = state_from_event(event, body)
            if found is not None:
                table.update(*found)
                if starter is not None:
                    starter.seen(found[0], found[1]["state"])
            elif event == "PROCESS_GROUP_REMOVED":
                table.remove(body.get("groupname", ""))
            elif event == "PROCESS_GROUP_ADDED":
                # before the first table read, the starter's first look sees it anyway
                if starter is not None and waiting is None:
                    starter.wake()
            elif event.startswith("TICK"):
                table.tick()
                if starter is not None and table.ticks % RESYNC_TICKS == 0:
                    # a group added while its event was lost (a full buffer)
                    starter.wake()
            if waiting is not None and table.seeded:
                waiting.wake()
                waiting = None
        except Exception:
            log.exception("event %r not handled", headers.get("eventname"))
        childutils.listener.ok(stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.fleet.programs",
                                     description="supervisord event listener of a powa-fleet")
    daemon.config_argument(parser)
    args = parser.parse_args(argv)
    # stdout belongs to the eventlistener protocol: logs go to stderr
    cfg = daemon.load_config("programs", args.config)
    # the worker programs do not start by themselves (autostart = false): the starter paces them
    starter = Starter(cfg.supervisor_socket, cfg.fleet.start_rate or default_rate())
    starter.start()
    try:
        serve(Table(cfg), sys.stdin, sys.stdout, starter)
    finally:
        starter.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
