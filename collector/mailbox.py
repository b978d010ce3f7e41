"""Commands from the control process to one worker, through Redis: both ends.

The control process ``ask()``s: it pushes a JSON request on
``<prefix>:commands:N`` and waits for the answer on the reply list it named.
The worker runs a ``Listener`` thread (a blocking pop with a short timeout),
so it answers while a snapshot runs; its handler wakes the main loop when
there is work for it.

Request: ``{"command": "force_snapshot", "reply_to": "<prefix>:reply:<token>"}``
Answer:  ``{"status": "OK" | "ERROR", "data": "<text>"}``
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable

import redis
import simplejson as json

from collector.backoff import Backoff
from collector.errors import ProtocolError
from collector.keys import client, commands_key, program_name, reply_key
from collector.logs import Outage, one_line

log = logging.getLogger(__name__)

#: how long a reply waits for its reader
REPLY_TTL = 30
#: a blocked pop costs nothing; waking up often would, times hundreds of workers
POP_TIMEOUT = 30
#: a request no worker read by then is dropped by Redis
REQUEST_TTL = 30

Handler = Callable[[str], tuple[str, str]]


def ask(connection: redis.Redis, prefix: str, srvid: int, command: str,
        timeout: float) -> tuple[str, str]:
    """Send ``command`` to worker ``srvid`` and wait for its (status, data) answer.

    ProtocolError, with a reason for the requester, when Redis or the worker
    does not answer in time.
    """
    reply_to = reply_key(prefix, secrets.token_hex(8))
    request = json.dumps({"command": command, "reply_to": reply_to})
    key = commands_key(prefix, srvid)
    try:
        with connection.pipeline(transaction=False) as pipe:
            pipe.rpush(key, request)
            # a worker that never reads it must not find it much later
            pipe.expire(key, REQUEST_TTL)
            pipe.execute()
        reply = connection.blpop([reply_to], timeout=timeout)
    except redis.RedisError as exc:
        raise ProtocolError(f"cannot reach {program_name(srvid)} through Redis: "
                            f"{one_line(exc)}") from None
    if reply is None:
        raise ProtocolError(f"{program_name(srvid)} did not answer within {timeout:.0f}s"
                            " (stuck?)")
    answer = json.loads(reply[1])
    return str(answer["status"]), str(answer["data"])


class Listener(threading.Thread):
    def __init__(self, url: str, prefix: str, srvid: int, handler: Handler) -> None:
        super().__init__(name=f"commands-{srvid}", daemon=True)
        # the socket timeout must outlast the blocking pop
        self.redis = client(url, socket_timeout=POP_TIMEOUT + 3)
        self.key = commands_key(prefix, srvid)
        self.reply_pattern = re.compile(re.escape(prefix) + r":reply:[A-Za-z0-9_-]{1,64}")
        self.handler = handler
        self._stopping = threading.Event()
        self._backoff = Backoff(initial=0.5, maximum=10.0)
        self._outage = Outage(log, "cannot read commands from Redis")

    def run(self) -> None:
        # requests queued for a previous life of this worker are stale
        self._call(lambda: self.redis.delete(self.key))
        while not self._stopping.is_set():
            item = self._call(lambda: self.redis.blpop([self.key], timeout=POP_TIMEOUT))
            if item is False:
                self._stopping.wait(self._backoff.next_delay())
            elif item is not None:
                self.handle(item[1])  # type: ignore[index]

    def _call(self, operation: Callable[[], object]) -> object:
        """Run a Redis call; False when Redis failed (logged once per outage)."""
        try:
            result = operation()
        except redis.RedisError as exc:
            if self._stopping.is_set():
                return None
            self._outage.failed(exc)
            return False
        self._outage.recovered("reading commands from Redis again")
        self._backoff.reset()
        return result

    def handle(self, raw: bytes) -> None:
        """Answer one request; malformed ones are logged and dropped."""
        try:
            request = json.loads(raw)
            command = request["command"]
            reply_to = request["reply_to"]
            if not isinstance(command, str) or not isinstance(reply_to, str):
                raise TypeError("command and reply_to must be strings")
            if not self.reply_pattern.fullmatch(reply_to):
                raise ValueError("reply_to is not a reply key of this fleet")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignored a malformed command: %s", one_line(exc))
            return
        status, data = self.handler(command)
        answer = json.dumps({"status": status, "data": data})
        self._call(lambda: self._reply(reply_to, answer))

    def _reply(self, reply_to: str, answer: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(reply_to, answer)
            pipe.expire(reply_to, REPLY_TTL)
            pipe.execute()

    def close(self) -> None:
        """Stop listening; the thread is a daemon, its pending pop dies with the process."""
        self._stopping.set()
        self.redis.close()
