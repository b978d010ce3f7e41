"""What one scrape reads from Redis: the workers' status documents, the program table, counters.

Nothing else is asked: a scrape never reaches a worker, supervisord or the
repository.  Every read of one scrape is a SCAN for the status keys, then one
pipeline; a Redis error is raised to the caller (``FleetCollector`` answers
``powa_fleet_redis_up 0``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from collector import counters
from collector.keys import alive_key, loads, programs_key, status_key
from collector.syncredis import redis

#: MGET this many status keys at a time (a whole fleet in a few round trips)
CHUNK = 500


@dataclass
class Reading:
    #: server id -> its status document, in srvid order
    documents: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: program name -> {"state", "pid", "since"}
    programs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the event listener keeps ``programs`` current
    programs_current: bool = False
    requests: dict[bytes, bytes] = field(default_factory=dict)
    answer_seconds: dict[bytes, bytes] = field(default_factory=dict)
    reload_seconds: dict[bytes, bytes] = field(default_factory=dict)


def status_ids(client: redis.Redis, prefix: str) -> list[int]:
    """Server ids with a status document (``<prefix>:worker:N``), sorted."""
    wanted = re.compile(re.escape(status_key(prefix, 0)[:-1]) + r"([1-9][0-9]{0,9})")
    found = set()
    for key in client.scan_iter(match=status_key(prefix, 0)[:-1] + "*", count=1000):
        match = wanted.fullmatch(key.decode("utf-8", "replace"))
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


def read(client: redis.Redis, prefix: str, host: str) -> Reading:
    """Everything a scrape shows, read now; RedisError when Redis does not answer."""
    srvids = status_ids(client, prefix)
    with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(srvids), CHUNK):
            pipe.mget([status_key(prefix, s) for s in srvids[start:start + CHUNK]])
        pipe.hgetall(programs_key(prefix, host))
        pipe.exists(alive_key(prefix, host))
        pipe.hgetall(counters.requests_key(prefix))
        pipe.hgetall(counters.answer_seconds_key(prefix))
        pipe.hgetall(counters.reload_seconds_key(prefix))
        *chunks, programs, alive, requests, answers, reloads = pipe.execute()
    texts = [text for chunk in chunks for text in chunk]
    documents = {srvid: document for srvid, document in
                 ((srvid, loads(text)) for srvid, text in zip(srvids, texts, strict=True))
                 if document is not None}
    return Reading(
        documents=documents,
        programs=_programs(programs),
        programs_current=bool(alive),
        requests=requests,
        answer_seconds=answers,
        reload_seconds=reloads,
    )


def _programs(raw: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    table = {}
    for name, text in raw.items():
        state = loads(text)
        if state is not None and isinstance(state.get("state"), str):
            table[name.decode("utf-8", "replace")] = state
    return table
