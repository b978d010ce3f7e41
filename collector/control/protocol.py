"""PoWA's collector protocol over LISTEN/NOTIFY: parsing requests, shaping answers.

Request on channel ``powa_collector``: ``COMMAND RESPONSE_CHANNEL [ARGS...]``,
space separated, ``-`` as channel for no answer.  Answer on the response
channel: ``COMMAND STATUS DATA``.  This is the wire format of upstream
powa-collector, which powa-web speaks; every field of a request is
untrusted.  Pure functions only: the control process does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import simplejson as json

from collector.errors import ProtocolError

CHANNEL = "powa_collector"
NO_ANSWER = "-"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
MAX_PAYLOAD = 7999
#: NAMEDATALEN - 1: longer identifiers would be truncated by PostgreSQL
MAX_CHANNEL = 63
#: PoWA 5: members of the roles ``powa_roles`` maps these to may send requests
POWA_ROLES = ("powa_signal_backend", "powa_write_all_data", "powa_admin")


@dataclass(frozen=True)
class Request:
    command: str
    channel: str
    args: tuple[str, ...]
    #: pid of the backend that sent the NOTIFY
    pid: int

    @property
    def answers(self) -> bool:
        return self.channel != NO_ANSWER


def parse(payload: str, pid: int) -> Request:
    """Split a payload like upstream does (on single spaces), ignoring empty fields.

    powa-web sends ``"WORKERS_STATUS r123 "`` (trailing space) when there is
    no argument: empty fields carry nothing.
    """
    fields = [f for f in payload.split(" ") if f]
    command = fields[0] if fields else ""
    channel = fields[1] if len(fields) > 1 else NO_ANSWER
    return Request(command, channel, tuple(fields[2:]), pid)


def channel_problem(channel: str) -> str | None:
    """Why a response channel cannot be answered faithfully, or None if it can.

    The channel is used as a quoted identifier, so case and any character are
    kept; what PostgreSQL would truncate or cannot carry is refused.
    """
    if channel == NO_ANSWER:
        return None
    if channel == CHANNEL:
        # the answer would come back to the control as a request of its own
        return f"response channel is {CHANNEL} itself"
    if "\0" in channel:
        return "response channel contains a NUL byte"
    if len(channel.encode("utf-8")) > MAX_CHANNEL:
        return f"response channel longer than {MAX_CHANNEL} bytes"
    return None


def is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10


def _describe(args: tuple[str, ...], limit: int = 200) -> str:
    text = repr(list(args))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_srvid(args: tuple[str, ...]) -> int:
    """FORCE_SNAPSHOT's single argument, validated as upstream does."""
    if len(args) != 1:
        raise ProtocolError(f'Command "{_describe(args)}" malformed')
    if not is_id(args[0]):
        raise ProtocolError(f"invalid remote server id {args[0][:40]}")
    return int(args[0])


def parse_refresh_db_cat(args: tuple[str, ...]) -> tuple[int, list[str]]:
    """REFRESH_DB_CAT srvid n db1 ... dbn, validated as upstream does (n = 0: all).

    The names are untrusted text: they are only ever compared with the
    remote's database names.
    """
    if len(args) < 2:
        raise ProtocolError(f'Command "{_describe(args)}" malformed')
    if not is_id(args[0]):
        raise ProtocolError(f"invalid remote server id {args[0][:40]}")
    if not is_id(args[1]):
        raise ProtocolError(f"invalid number of databases {args[1][:40]}")
    count, dbnames = int(args[1]), list(args[2:])
    if count != len(dbnames):
        raise ProtocolError(
            f"Caller asked for {count} db, but found {len(dbnames)}: {_describe(args[2:])}"
        )
    return int(args[0]), dbnames


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def answer(command: str, status: str, data: str) -> str:
    """``COMMAND STATUS DATA``, shortened to fit a NOTIFY payload.

    The command is echoed as received (powa-web matches on it) unless it
    alone would not fit; the data is cut with an ellipsis.
    """
    head = f"{command} {status} "
    if _size(head) > MAX_PAYLOAD // 2:
        head = f"{_cut(command, MAX_PAYLOAD // 2)} {status} "
    room = MAX_PAYLOAD - _size(head)
    return head + (data if _size(data) <= room else _cut(data, room))


def _cut(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: max(0, limit - 3)].decode("utf-8", "ignore") + "..."


OMITTED_KEY = "omitted"


def workers_status_json(statuses: Mapping[int, str], room: int) -> str:
    """``{"<srvid>": "<status>", ...}`` in at most ``room`` bytes.

    When the whole fleet does not fit, servers that are not ``running`` come
    first (they are what an operator needs to see), then running ones while
    they fit, and ``"omitted": N`` says how many were left out.
    """
    # a fleet has a handful of distinct statuses: encode each once
    encoded = {status: json.dumps(status) for status in set(statuses.values())}
    entries = [(srvid, f'"{srvid}": {encoded[status]}') for srvid, status in
               sorted(statuses.items())]
    full = "{" + ", ".join(entry for _, entry in entries) + "}"
    if _size(full) <= room:
        return full
    entries.sort(key=lambda item: statuses[item[0]] == "running")
    kept: list[str] = []
    # "omitted" with the largest count it may take, so the result surely fits
    used = 2 + _size(f', "{OMITTED_KEY}": {len(entries)}')
    for _, entry in entries:
        size = _size(entry) + 2
        if used + size > room:
            break
        kept.append(entry)
        used += size
    kept.append(f'"{OMITTED_KEY}": {len(entries) - len(kept)}')
    return "{" + ", ".join(kept) + "}"
