"""Commands from the control process to one worker, through Redis.

The control process pushes a JSON request on ``<prefix>:commands:N``
and waits for the answer on the reply list it named.  The worker listens in
a thread of its own (a blocking pop with a short timeout), so it answers
while a snapshot runs, and wakes its main loop when there is work for it.

Request: ``{"command": "force_snapshot", "reply_to": "<prefix>:reply:<token>"}``
Answer:  ``{"status": "OK" | "ERROR", "data": "<text>"}``
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import redis
import simplejson as json

from collector.logs import one_line
from collector.schedule import Backoff
from collector.status import client, commands_key

log = logging.getLogger(__name__)

#: how long a reply waits for its reader
REPLY_TTL = 30
#: a blocked pop costs nothing; waking up often would, times hundreds of workers
POP_TIMEOUT = 30

Handler = Callable[[str], tuple[str, str]]


class CommandListener(threading.Thread):
    def __init__(self, url: str, prefix: str, srvid: int, handler: Handler) -> None:
        super().__init__(name=f"commands-{srvid}", daemon=True)
        # the socket timeout must outlast the blocking pop
        self.redis = client(url, socket_timeout=POP_TIMEOUT + 3)
        self.key = commands_key(prefix, srvid)
        self.reply_pattern = re.compile(re.escape(prefix) + r":reply:[A-Za-z0-9_-]{1,64}")
        self.handler = handler
        self._stopping = threading.Event()
        self._backoff = Backoff(initial=0.5, maximum=10.0)
        self._failing = False

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
            if not self._failing:
                log.warning("cannot read commands from Redis (will keep trying): %s",
                            one_line(exc))
                self._failing = True
            return False
        if self._failing:
            log.info("reading commands from Redis again")
            self._failing = False
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
