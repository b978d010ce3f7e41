"""Commands from the control process to one worker, through Redis: both ends.

The control process ``ask()``s: it pushes a JSON request on
``<prefix>:commands:N`` and waits for the answer on the reply list it named.
The worker runs a ``Listener`` thread (a blocking pop with a short timeout),
so it answers while a snapshot runs; its handler wakes the main loop when
there is work for it.

Request: ``{"command": "force_snapshot", "reply_to": "<prefix>:reply:<token>"}``,
with ``"args": ["<text>", ...]`` when the command takes arguments (e.g.
``refresh_db_cat`` and its database names); no ``args`` means none.
Answer:  ``{"status": "OK" | "ERROR", "data": "<text>"}``

Redis is not trusted: a request travels as ``{"body": "<request JSON>",
"mac": "<hex>"}``, the body carrying ``"expires"`` (epoch seconds), the mac
an HMAC-SHA256 of the body with the fleet's key.  The key lives in the fleet
directory (``.mailbox.key``, mode 0600, made on first use), never in Redis:
whoever can only write to Redis cannot make a worker act, and a captured
request cannot be replayed once it expired.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import simplejson as json

from collector.backoff import Backoff
from collector.errors import ProtocolError
from collector.keys import client, commands_key, program_name, reply_key
from collector.logs import Outage, one_line

if TYPE_CHECKING:
    from collector.syncredis import redis

log = logging.getLogger(__name__)

#: how long a reply waits for its reader
REPLY_TTL = 30
#: a blocked pop costs nothing; waking up often would, times hundreds of workers
#: (each wake-up, a new pop, costs a worker about 0.6 ms of CPU).  A Redis that
#: restarts resets the connection at once; only a silently vanished one waits this
POP_TIMEOUT = 120
#: a request no worker read by then is dropped by Redis
REQUEST_TTL = 30

KEY_FILE = ".mailbox.key"

#: (command, args) -> (status, data)
Handler = Callable[[str, tuple[str, ...]], tuple[str, str]]


def fleet_key(directory: Path) -> bytes:
    """The fleet's command key, made (random, 0600) by whichever program needs it first."""
    path = directory / KEY_FILE
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    for _ in range(50):
        key = path.read_text().strip()
        if key:
            return key.encode()
        # its maker is writing it right now
        time.sleep(0.01)
    raise OSError(f"{path} is empty: remove it, it is made again")


def seal(key: bytes, message: dict[str, object]) -> str:
    """A request as it travels: its body and the body's HMAC."""
    body = json.dumps({**message, "expires": round(time.time() + REQUEST_TTL, 3)})
    mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    return str(json.dumps({"body": body, "mac": mac}))


def unseal(key: bytes, raw: bytes | str) -> dict[str, object]:
    """The request of a sealed message; ValueError if forged, malformed or expired."""
    sealed = json.loads(raw)
    if not isinstance(sealed, dict) or not isinstance(sealed.get("body"), str) \
            or not isinstance(sealed.get("mac"), str):
        raise ValueError("not a sealed request")
    body = sealed["body"]
    expected = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, sealed["mac"]):
        raise ValueError("bad signature: not sent by this fleet's control")
    request = json.loads(body)
    if not isinstance(request, dict):
        raise ValueError("not a request")
    expires = request.get("expires")
    if not isinstance(expires, int | float) or expires < time.time():
        raise ValueError("expired")
    return request


def ask(connection: redis.Redis, prefix: str, srvid: int, command: str,
        timeout: float, *, key: bytes, args: Sequence[str] = ()) -> tuple[str, str]:
    """Send ``command`` (with ``args``) to worker ``srvid``, wait for its (status, data).

    ProtocolError, with a reason for the requester, when Redis or the worker
    does not answer in time.
    """
    from collector.syncredis import redis  # noqa: PLC0415 - see keys.client

    reply_to = reply_key(prefix, secrets.token_hex(8))
    message: dict[str, object] = {"command": command, "reply_to": reply_to}
    if args:
        message["args"] = list(args)
    request = seal(key, message)
    queue = commands_key(prefix, srvid)
    try:
        with connection.pipeline(transaction=False) as pipe:
            pipe.rpush(queue, request)
            # a worker that never reads it must not find it much later
            pipe.expire(queue, REQUEST_TTL)
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
    def __init__(self, url: str, prefix: str, srvid: int, handler: Handler,
                 key: bytes) -> None:
        super().__init__(name=f"commands-{srvid}", daemon=True)
        self.secret = key
        # the socket timeout must outlast the blocking pop, which checks the
        # connection's health by itself (no PING before each pop)
        self.redis = client(url, socket_timeout=POP_TIMEOUT + 3, health_check_interval=0)
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
        from collector.syncredis import redis  # noqa: PLC0415 - see keys.client

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
            request = unseal(self.secret, raw)
            command = request["command"]
            reply_to = request["reply_to"]
            args = request.get("args", [])
            if not isinstance(command, str) or not isinstance(reply_to, str):
                raise TypeError("command and reply_to must be strings")
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise TypeError("args must be a list of strings")
            if not self.reply_pattern.fullmatch(reply_to):
                raise ValueError("reply_to is not a reply key of this fleet")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignored a command: %s", one_line(exc))
            return
        status, data = self.handler(command, tuple(args))
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
