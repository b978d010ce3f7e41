"""Worker status in Redis: names of the keys, and the publishing thread.

The status of server N is a JSON object at ``<prefix>:worker:N`` with a TTL;
a heartbeat rewrites it well inside the TTL, so the key of a worker that
died or froze expires by itself.  Every change is also published on
``<prefix>:status``, and a heartbeat without change as ``"<srvid> <pid>"`` on
``<prefix>:heartbeat``.  Publishing happens in a thread of its own with short
socket timeouts: a Redis that is down or hung never blocks a snapshot, and
the latest status is written again as soon as Redis answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis
import simplejson as json

from collector.logs import REDACTOR, one_line
from collector.schedule import Backoff

log = logging.getLogger(__name__)

STATUS_RUNNING = "running"
STATUS_STOPPING = "stopping"
STATUS_STOPPED = "stopped"
STATUS_NO_REMOTE = "no connection to remote server"
STATUS_NO_REPOSITORY = "no connection to repository server"


def status_key(prefix: str, srvid: int) -> str:
    return f"{prefix}:worker:{srvid}"


def status_channel(prefix: str) -> str:
    return f"{prefix}:status"


def heartbeat_channel(prefix: str) -> str:
    return f"{prefix}:heartbeat"


def commands_key(prefix: str, srvid: int) -> str:
    # not under <prefix>:worker:*, where every key is a status document
    return f"{prefix}:commands:{srvid}"


def reply_key(prefix: str, token: str) -> str:
    return f"{prefix}:reply:{token}"


def client(url: str, socket_timeout: float = 2.0) -> redis.Redis:
    """A Redis client that fails fast instead of hanging when Redis is away."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=socket_timeout,
        health_check_interval=15,
        retry_on_timeout=False,
    )


def loads(text: bytes | str | None) -> dict[str, Any] | None:
    """A JSON object read from Redis; None when absent or not an object."""
    if not text:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


#: fields of a status document that hold text from elsewhere (errors, powa_servers)
FREE_TEXT = ("alias", "last_error")


def dumps(document: Mapping[str, Any]) -> str:
    """JSON text of a status document, its free text passed through the redactor.

    The other fields are numbers, times and this program's own words: masking a
    password that happens to be a common word ("server") inside them would
    change the statuses powa-web shows.
    """
    redacted = {key: REDACTOR.redact(value) if key in FREE_TEXT and isinstance(value, str)
                else value for key, value in document.items()}
    return str(json.dumps(redacted, sort_keys=True, ensure_ascii=False))


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
        self._down_since: float | None = None
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
        document = {**document, "updated_at": _iso(time.time())}
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
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("cannot write status to Redis (will keep trying): %s", one_line(exc))
            return False
        if self._down_since is not None:
            log.info(
                "status written to Redis again after %.0fs",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
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


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def iso(epoch: float | None) -> str | None:
    """ISO 8601 UTC text of an epoch, None stays None."""
    return None if epoch is None else _iso(epoch)
