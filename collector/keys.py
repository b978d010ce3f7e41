"""The names every process of a fleet shares, and how they read and write Redis.

* program names in supervisord (``worker_N``, ``control``): built from the
  integer server id only, never from text of ``powa_servers``;
* Redis keys and channels under the configured prefix: the status of server N
  at ``<prefix>:worker:N`` (a JSON object with a TTL), its changes on
  ``<prefix>:status``, heartbeats on ``<prefix>:heartbeat``, supervisord's
  program states at ``<prefix>:programs:<host>``, commands at ``<prefix>:commands:N``;
* the status strings powa-web shows;
* a Redis client that fails fast, and the JSON codec of status documents.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import simplejson as json

from collector.logs import REDACTOR

if TYPE_CHECKING:
    from collector.syncredis import redis

log = logging.getLogger(__name__)

STATUS_RUNNING = "running"
STATUS_STOPPING = "stopping"
STATUS_STOPPED = "stopped"
STATUS_NO_REMOTE = "no connection to remote server"
STATUS_NO_REPOSITORY = "no connection to repository server"

#: the control process's program name
CONTROL = "control"
#: the event listener's name (``[eventlistener:programs]``)
LISTENER = "programs"
#: the Prometheus endpoint's program (when ``[metrics] listen`` is set)
METRICS = "metrics"
#: the workers' fork server (when ``[fleet] spawner`` is on)
SPAWNER = "spawner"


def program_name(srvid: int) -> str:
    """The supervisord program of server ``srvid``: the one place this name is made."""
    return f"worker_{int(srvid)}"


def worker_id(name: str) -> int | None:
    """The server id of a worker's program name; None for any other program."""
    digits = name.removeprefix("worker_")
    if digits == name or not (digits.isascii() and digits.isdigit()) or digits[0] == "0":
        return None
    return int(digits)


def status_key(prefix: str, srvid: int) -> str:
    return f"{prefix}:worker:{srvid}"


def owner_key(prefix: str, srvid: int) -> str:
    """The pid of the worker that publishes server N's status (one at a time)."""
    # not under <prefix>:worker:*, where every key is a status document
    return f"{prefix}:owner:{srvid}"


def status_channel(prefix: str) -> str:
    return f"{prefix}:status"


def heartbeat_channel(prefix: str) -> str:
    return f"{prefix}:heartbeat"


def commands_key(prefix: str, srvid: int) -> str:
    # not under <prefix>:worker:*, where every key is a status document
    return f"{prefix}:commands:{srvid}"


def reply_key(prefix: str, token: str) -> str:
    return f"{prefix}:reply:{token}"


def programs_key(prefix: str, host: str) -> str:
    """Hash of one host's supervisord program states, and the channel of their changes.

    One per collector host (``[fleet] host``): the hosts sharing a fleet each run
    their own supervisord, and their program tables must not overwrite each other.
    """
    return f"{prefix}:programs:{host}"


#: readers consider ``programs_key`` current while ``alive_key`` lives (seconds)
ALIVE_TTL = 20


def alive_key(prefix: str, host: str) -> str:
    """Lives while the host's event listener keeps its ``programs_key`` current."""
    return f"{prefix}:programs-alive:{host}"


def client(url: str, socket_timeout: float = 2.0, health_check_interval: int = 15,
           ) -> redis.Redis:
    """A Redis client that fails fast instead of hanging when Redis is away."""
    # imported on first use: a --once worker never talks to Redis, and saves the time
    from collector.syncredis import redis  # noqa: PLC0415

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=1.0,
        socket_timeout=socket_timeout,
        health_check_interval=health_check_interval,
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


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def iso(epoch: float | None) -> str | None:
    """ISO 8601 UTC text of an epoch, None stays None."""
    return None if epoch is None else _iso(epoch)
