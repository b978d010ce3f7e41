"""The worker's status in Redis, kept current by a thread of its own.

A heartbeat rewrites the status key well inside its TTL, so the key of a
worker that died or froze expires by itself.  Every change is also published
on ``<prefix>:status``, and a heartbeat without change as ``"<srvid> <pid>"``
on ``<prefix>:heartbeat``.  The thread has short socket timeouts: a Redis
that is down or hung never blocks a snapshot, and the latest status is
written again as soon as Redis answers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from collector import spawning
from collector.backoff import Backoff
from collector.keys import (
    STATUS_RUNNING,
    client,
    dumps,
    heartbeat_channel,
    iso,
    owner_key,
    status_channel,
    status_key,
)
from collector.logs import Outage

log = logging.getLogger(__name__)

#: the status key, the channel message and the owner ("host/pid"), in one step.  A key
#: owned by another worker of the same server is left alone (its owner returned),
#: unless that worker runs on another host and this one collects the server
#: (ARGV[5] = this host, ARGV[6] = '1'): the lease, in the repository, said it is
#: this host's turn, and a host that died must not hold the status for a whole TTL
_PUBLISH = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then
    local host = string.match(owner, '^(.*)/[0-9]+$')
    if ARGV[6] ~= '1' or host == nil or host == ARGV[5] then
        return owner
    end
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[4])
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
end
return 0
"""


#: woken by its own plan, the thread also writes what is due this much later (seconds)
PLANNED_EARLY = 0.5


class StatusPublisher(threading.Thread):
    """Keeps the latest status document of a worker in Redis."""

    def __init__(self, url: str, prefix: str, srvid: int, ttl: int,
                 host: str = "") -> None:
        super().__init__(name=f"status-{srvid}", daemon=True)
        self.redis = client(url)
        self.key = status_key(prefix, srvid)
        self.channel = status_channel(prefix)
        self.heartbeat_channel = heartbeat_channel(prefix)
        self.srvid = srvid
        self.ttl = ttl
        self.heartbeat = max(1.0, ttl / 3)
        self._lock = threading.Lock()
        self._document: dict[str, Any] | None = None
        self._changed = threading.Event()
        self._stopping = threading.Event()
        #: the handed-over document must be written by then (monotonic)
        self._write_by = float("inf")
        #: when the thread wakes by itself next (monotonic; 0: it is not waiting yet)
        self._wake_at = 0.0
        #: the thread is awake by then anyway (the next snapshot's start may be written
        #: by then): a change handed over for no earlier need not wake it
        self._expected = float("inf")
        #: the document last written, as handed over (no "updated_at")
        self._published: dict[str, Any] | None = None
        #: when the key must be written again for its TTL, even unchanged
        self._heartbeat_at = 0.0
        self._outage = Outage(log, "cannot write status to Redis")
        self._backoff = Backoff(initial=0.5, maximum=self.heartbeat)
        #: set once a document is in Redis; tests and the final write wait on it
        self.written = threading.Event()
        #: held by whoever writes: the thread, or the caller of write_now()
        self._writing = threading.Lock()
        #: Redis answered the last write: write_now() may write in its caller's thread
        self._answering = False
        self.pid = spawning.program_pid()
        #: this collector host ([fleet] host): statuses of a server move with its lease
        self.host = host
        self.owner = f"{host}/{self.pid}"
        self.owner_key = owner_key(prefix, srvid)
        self._publish = self.redis.register_script(_PUBLISH)
        self._release = self.redis.register_script(_RELEASE)
        #: pid of the other worker that owns this server's status, while one does
        self._other: bytes | None = None

    def update(self, document: dict[str, Any], within: float = 0.0,
               expected: float = float("inf")) -> None:
        """Hand over a new status (non-blocking); the thread writes it.

        ``within``: it may wait that many seconds, and be replaced meanwhile
        (a snapshot's start, followed a moment later by its end: one write).
        ``expected``: when the next change that may wait is due to be written
        (monotonic; the next snapshot's start plus its ``within``).  The thread
        plans to be awake then, so that change costs it no wake-up of its own.
        """
        with self._lock:
            self._document = dict(document)
            self._write_by = min(self._write_by, time.monotonic() + within)
            self._expected = expected
            # the thread already plans to wake by then: no need to wake it now
            wake = self._write_by < self._wake_at
        if wake:
            self._changed.set()

    def run(self) -> None:
        delay = 0.0
        while not self._stopping.is_set():
            with self._lock:
                now = time.monotonic()
                if self._expected <= now:
                    self._expected = float("inf")
                due = min(self._write_by, self._heartbeat_at, self._expected)
                self._wake_at = now + delay if delay else due
            woken = self._changed.wait(delay or max(0.0, due - time.monotonic()))
            self._changed.clear()
            if self._stopping.is_set():
                break
            with self._lock:
                # awake by its own plan, it writes what is due a moment later now:
                # one wake-up, not two (a snapshot's start comes a little after its
                # due time, and the thread planned to be awake then)
                early = 0.0 if woken else PLANNED_EARLY
                if time.monotonic() + early < min(self._write_by, self._heartbeat_at):
                    # a change that may wait: until its time, or the next change
                    delay = 0.0
                    continue
                self._write_by = float("inf")
            with self._writing:
                written = self._write()
            delay = 0.0 if written else self._backoff.next_delay()

    def write_now(self, document: dict[str, Any], expected: float = float("inf")) -> None:
        """A status written by the caller at once, when that cannot make it wait long.

        For the end of a snapshot: the worker's main thread has just committed
        it and is running, and a write there costs a fraction of what it costs
        the thread woken for it (a thread waking from a sleep runs its first
        few hundred microseconds several times slower).  Only while Redis
        answered the last write and the thread is not writing; otherwise the
        thread writes it, as any change.  A Redis that stops answering holds
        the caller once, for the client's socket timeout (after the snapshot
        is committed), then the thread takes over with its backoff.
        """
        if self._writing.acquire(blocking=False):
            try:
                if self._answering:
                    with self._lock:
                        self._document = dict(document)
                        self._write_by = float("inf")
                        self._expected = expected
                    if self._write():
                        return
            finally:
                self._writing.release()
        self.update(document, 0.0, expected)

    def _write(self, force: bool = False) -> bool:
        """Write the latest document if it changed or a heartbeat is due; False if Redis failed."""
        from collector.syncredis import redis  # noqa: PLC0415 - see keys.client

        now = time.monotonic()
        with self._lock:
            document = self._document
        if document is None:
            self._heartbeat_at = now + self.heartbeat
            return True
        # the documents compared as they are handed over, without "updated_at"
        changed = document != self._published
        if not changed and not force and now < self._heartbeat_at:
            # only the heartbeat time would change, and the key's TTL does not need it yet
            return True
        text = dumps({**document, "updated_at": iso(time.time())})
        if changed:
            channel, message = self.channel, text
        else:
            # nothing changed: followers only learn the worker is alive
            channel, message = self.heartbeat_channel, f"{self.srvid} {document.get('pid')}"
        try:
            owner = self._publish(
                keys=[self.key, self.owner_key, channel],
                args=[self.owner, text, self.ttl, message, self.host,
                      "1" if document.get("status") == STATUS_RUNNING else "0"],
            )
        except redis.RedisError as exc:
            self._answering = False
            self._outage.failed(exc)
            return False
        self._answering = True
        # another worker's key is looked at again at the next heartbeat, as before
        self._heartbeat_at = now + self.heartbeat
        if owner is not None:
            self._not_owner(owner)
            return True
        self._outage.recovered("status written to Redis again")
        if self._other is not None:
            log.info("publishing the status of server %d again", self.srvid)
            self._other = None
        self._backoff.reset()
        self._published = document
        self.written.set()
        return True

    def _not_owner(self, owner: bytes) -> None:
        if owner != self._other:
            log.warning("another worker of server %d (%s, host/pid) publishes its status: this"
                        " one (%s) does not (the repository lets one snapshot of a server run"
                        " at a time, whoever takes it)", self.srvid,
                        owner.decode(errors="replace"), self.owner)
            self._other = owner

    def close(self, final: dict[str, Any] | None = None, timeout: float = 2.0) -> None:
        """Stop the thread, writing ``final`` once more if Redis answers quickly."""
        self._stopping.set()
        self._changed.set()
        self.join(timeout)
        if final is not None:
            # bounded by the client's connect and socket timeouts
            self.update(final)
            with self._writing:
                self._write(force=True)
        from collector.syncredis import redis  # noqa: PLC0415 - see keys.client

        # the next worker of this server (a restart) publishes at once
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[self.owner_key], args=[self.owner])
        self.redis.close()


