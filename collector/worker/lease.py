"""The check a snapshot makes before it copies anything: is this server ours to collect?

Inside the snapshot's repository transaction, with the server's
``powa_snapshot_metas`` row locked (so the answer holds until commit):

* the server's lease (collector.hosts) must not be held by another host's
  lease session: a worker whose host lost the server (a stale membership
  view, a network split healed, a handover under way) stores nothing;
* a scheduled snapshot is skipped when the server's last one, whoever took
  it, is younger than half its period: two hosts handing a server over
  never snapshot it twice in a row.  A forced one (FORCE_SNAPSHOT, --once)
  is the operator's wish and is not held back.

A lease held by nobody is no reason to wait: a host whose control is down
keeps collecting with its running workers until another host takes the lease.
"""

from __future__ import annotations

from psycopg import sql

from collector import hosts
from collector.errors import LeaseHeldError, SnapshotTooSoon
from collector.pg import Conn, PowaExtension, composed

#: the lease's holder (its session's application_name; NULL: nobody) and the age of
#: the server's last snapshot (NULL: none), in one round trip
_CHECK = """
SELECT (SELECT a.application_name
          FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s
           AND l.objsubid = 2 AND l.granted
         LIMIT 1),
       (SELECT extract(epoch FROM pg_catalog.now() - snapts)::float8 FROM {}
         WHERE srvid = %s AND snapts > '-infinity')
"""


class LeaseCheck:
    def __init__(self, host: str, srvid: int, frequency: float, forced: bool) -> None:
        self.host = host
        self.srvid = srvid
        self.frequency = frequency
        self.forced = forced

    def __call__(self, repo: Conn, powa: PowaExtension) -> None:
        """Raise LeaseHeldError or SnapshotTooSoon when this snapshot must not be taken."""
        query = composed(repo, ("lease check", powa.schema), lambda: sql.SQL(_CHECK).format(
            powa.name("powa_snapshot_metas")))
        row = repo.execute(query, (hosts.LEASE_CLASS, self.srvid, self.srvid)).fetchone()
        assert row is not None
        name, age = row
        if name is not None:
            holder = hosts.lease_holder(str(name))
            if holder != self.host:
                raise LeaseHeldError(self.srvid, holder or f"unknown ({name!r})")
        if self.forced:
            return
        if age is not None and float(age) < self.frequency / 2:
            raise SnapshotTooSoon(
                f"the last snapshot of server {self.srvid} is {float(age):.0f}s old, less than"
                f" half its period of {self.frequency:.0f}s: another collector took it",
                float(age))
