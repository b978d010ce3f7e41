"""The worker's status in Redis, kept current by a thread of its own.

A heartbeat rewrites the status key well inside its TTL, so the key of a
worker that died or froze expires by itself.  Every change is also published
on ``<prefix>:status``, and a heartbeat without change as ``"<srvid> <pid>"``
on ``<prefix>:heartbeat``.  The thread has short socket timeouts: a Redis
that is down or hung never blocks a snapshot, and the latest status is
written again as soon as Redis answers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from collector.backoff import Backoff
from collector.keys import client, dumps, heartbeat_channel, iso, status_channel, status_key
from collector.logs import Outage

log = logging.getLogger(__name__)


class StatusPublisher(threading.Thread):
    """Keeps the latest status document of a worker in Redis."""

    def __init__(self, url: str, prefix: str, srvid: int, ttl: int) -> None:
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
        self._published: str | None = None
        self._outage = Outage(log, "cannot write status to Redis")
        self._backoff = Backoff(initial=0.5, maximum=self.heartbeat)
        #: set once a document is in Redis; tests and the final write wait on it
        self.written = threading.Event()

    def update(self, document: dict[str, Any]) -> None:
        """Hand over a new status (non-blocking); the thread writes it."""
        with self._lock:
            self._document = dict(document)
        self._changed.set()

    def run(self) -> None:
        delay = 0.0
        while not self._stopping.is_set():
            self._changed.wait(delay or self.heartbeat)
            self._changed.clear()
            if self._stopping.is_set():
                break
            delay = 0.0 if self._write() else self._backoff.next_delay()

    def _write(self) -> bool:
        with self._lock:
            document = self._document
        if document is None:
            return True
        document = {**document, "updated_at": iso(time.time())}
        # what changed, other than the heartbeat itself, is published
        comparable = dumps({k: v for k, v in document.items() if k != "updated_at"})
        text = dumps(document)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.key, text, ex=self.ttl)
                if comparable != self._published:
                    pipe.publish(self.channel, text)
                else:
                    # nothing changed: followers only learn the worker is alive
                    pipe.publish(self.heartbeat_channel, f"{self.srvid} {document.get('pid')}")
                pipe.execute()
        except redis.RedisError as exc:
            self._outage.failed(exc)
            return False
        self._outage.recovered("status written to Redis again")
        self._backoff.reset()
        self._published = comparable
        self.written.set()
        return True

    def close(self, final: dict[str, Any] | None = None, timeout: float = 2.0) -> None:
        """Stop the thread, writing ``final`` once more if Redis answers quickly."""
        self._stopping.set()
        self._changed.set()
        self.join(timeout)
        if final is not None:
            # bounded by the client's connect and socket timeouts
            self.update(final)
            self._write()
        self.redis.close()


