"""Who gets served, and in which order: a control no role can silence.

Any role that may connect to the repository may NOTIFY ``powa_collector``.
So that a flood of requests from roles without the right never delays
powa-web's answers:

* the permission of a sending backend is checked once, then cached for
  ``TTL`` seconds per backend pid (a pid is reused by a new backend only once
  the old one ended; the cache forgets it soon after);
* in every batch of notifications read together, privileged requests are
  served first, and identical requests of one session are served once;
* a request whose backend is gone by the time it is read is dropped: no one
  listens for its answer, and it says nothing of its role;
* a refused backend gets its ``ERROR Permission denied`` at most
  ``REFUSALS`` times per ``REFUSAL_EVERY`` seconds (a person clicking gets
  every answer, a flood does not); what it sends beyond is dropped and
  counted, and logged once per backend per minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from psycopg import sql

from collector.control import protocol
from collector.pg import Conn, PowaExtension

log = logging.getLogger("collector.control")

_PERMISSION_14 = sql.SQL(
    "SELECT pg_catalog.pg_has_role(a.usesysid, 'pg_signal_backend', 'USAGE')"
    " FROM pg_catalog.pg_stat_activity a WHERE a.pid = %s"
)
_PERMISSION_OLD = sql.SQL(
    "SELECT pg_catalog.has_table_privilege(a.usesysid, {}, 'INSERT')"
    " FROM pg_catalog.pg_stat_activity a WHERE a.pid = %s"
)

#: seconds a backend's permission is trusted without asking again
TTL = 5.0
#: a refused backend is answered at most REFUSALS times per REFUSAL_EVERY seconds
REFUSALS = 5
REFUSAL_EVERY = 1.0
#: refusals of one backend are logged this often at most
LOG_EVERY = 60.0
#: the cache never holds more backends than this
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Incoming:
    pid: int
    payload: str


@dataclass
class _Refused:
    #: start of the current window, and the answers given in it
    answered_at: float = float("-inf")
    answers: int = 0
    logged_at: float = float("-inf")
    dropped: int = 0


@dataclass
class Admission:
    #: True: allowed, False: refused, None: the backend is gone
    check: Callable[[int], bool | None]
    clock: Callable[[], float] = time.monotonic
    _verdicts: dict[int, tuple[bool, float]] = field(default_factory=dict)
    _refused: dict[int, _Refused] = field(default_factory=dict)
    #: requests dropped since the start (refused backends flooding)
    dropped: int = 0
    #: requests dropped since the start because their backend was gone
    orphans: int = 0

    def allowed(self, pid: int) -> bool | None:
        """May this backend send requests?  None: it is gone (never cached)."""
        now = self.clock()
        cached = self._verdicts.get(pid)
        if cached is not None and now - cached[1] < TTL:
            return cached[0]
        if len(self._verdicts) >= MAX_ENTRIES:
            self._forget(now)
        verdict = self.check(pid)
        if verdict is not None:
            self._verdicts[pid] = (verdict, now)
        return verdict

    def sort(self, batch: Iterable[Incoming]) -> tuple[list[Incoming], list[Incoming]]:
        """(privileged, refused) requests of a batch, each once, in order of arrival."""
        seen: set[Incoming] = set()
        privileged: list[Incoming] = []
        refused: list[Incoming] = []
        for item in batch:
            if item in seen:
                continue
            seen.add(item)
            verdict = self.allowed(item.pid)
            if verdict is None:
                self.orphans += 1
                log.debug("request from pid %d dropped: its session ended before it was read",
                          item.pid)
                continue
            (privileged if verdict else refused).append(item)
        return privileged, refused

    def answer_refusal(self, pid: int) -> bool:
        """Should this refused request get its answer (else it is dropped)?"""
        now = self.clock()
        state = self._refused.setdefault(pid, _Refused())
        if now - state.answered_at >= REFUSAL_EVERY:
            state.answered_at, state.answers = now, 0
        if state.answers < REFUSALS:
            state.answers += 1
            answer = True
        else:
            state.dropped += 1
            self.dropped += 1
            answer = False
        if now - state.logged_at >= LOG_EVERY:
            log.warning("requests from pid %d refused: its role may not signal backends"
                        " (%d dropped unanswered since the last report)", pid, state.dropped)
            state.logged_at, state.dropped = now, 0
        return answer

    def _forget(self, now: float) -> None:
        self._verdicts = {pid: v for pid, v in self._verdicts.items() if now - v[1] < TTL}
        self._refused = {pid: r for pid, r in self._refused.items()
                         if now - r.answered_at < LOG_EVERY}


def permission(conn: Conn, powa: PowaExtension, pid: int) -> bool | None:
    """May the sending backend's role send requests?  None: that backend is gone.

    Members of ``pg_signal_backend`` (PostgreSQL 14+) and, on PoWA 5, of
    the roles ``powa_roles`` maps ``powa_signal_backend``,
    ``powa_write_all_data`` and ``powa_admin`` to; before both, roles able
    to INSERT into ``powa_statements`` (upstream's rules).
    """
    predefined = ["pg_signal_backend"] if conn.info.server_version >= 140000 else []
    if powa.major >= 5:
        # roles by oid, and only those that exist: a powa_roles row may name none yet
        query = sql.SQL(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles r"
            " WHERE (r.rolname::text = ANY (%s::text[])"
            " OR r.rolname IN (SELECT p.rolname FROM {} p"
            " WHERE p.powa_role::text = ANY (%s::text[])))"
            " AND pg_catalog.pg_has_role(a.usesysid, r.oid, 'USAGE'))"
            " FROM pg_catalog.pg_stat_activity a WHERE a.pid = %s"
        ).format(powa.name("powa_roles"))
        row = conn.execute(query, (predefined, list(protocol.POWA_ROLES), pid)).fetchone()
    elif predefined:
        row = conn.execute(_PERMISSION_14, (pid,)).fetchone()
    else:
        # the quoted name as text: has_table_privilege parses it like SQL would
        table = sql.Literal(powa.name("powa_statements").as_string(conn))
        row = conn.execute(_PERMISSION_OLD.format(table), (pid,)).fetchone()
    # no row: the sender is gone
    return None if row is None else row[0] is True
