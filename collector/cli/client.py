"""A client of the collector protocol that behaves exactly like powa-web.

LISTEN on a random channel ``rNNNNN``, ``NOTIFY powa_collector, 'CMD rNNNNN
args'``, wait for the answer up to a timeout, parse ``COMMAND STATUS DATA``.
Used by ``python -m collector notify``, the tests and the benchmarks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from collector.control import protocol
from collector.pg import Conn


@dataclass(frozen=True)
class Answer:
    command: str
    status: str
    data: str
    #: seconds from the NOTIFY to the answer
    elapsed: float


class Client:
    """One repository connection used to send requests, like powa-web's."""

    def __init__(self, dsn: str, connect_timeout: int = 10) -> None:
        self.conn: Conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=connect_timeout,
            application_name="powa-fleet client",
        )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(
        self,
        command: str,
        args: Sequence[str] = (),
        timeout: float = 3.0,
        channel: str | None = None,
    ) -> list[Answer]:
        """Send one request; its answer if it comes within ``timeout`` (else an empty list)."""
        channel = channel or f"r{random.randint(1, 99999)}"
        conn = self.conn
        conn.execute("UNLISTEN *")
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        # powa-web's exact payload, trailing space included when there is no argument
        payload = f"{command} {channel} {' '.join(args)}"
        started = time.perf_counter()
        conn.execute("SELECT pg_catalog.pg_notify(%s, %s)", (protocol.CHANNEL, payload))
        answers = []
        # until the answer to this command: a stale or foreign notification on a
        # channel of the same name (powa-web names them alike) does not end the wait
        for notify in conn.notifies(timeout=timeout):
            if notify.channel != channel:
                continue
            received, _, rest = notify.payload.partition(" ")
            status, _, data = rest.partition(" ")
            if received == command:
                answers.append(Answer(received, status, data, time.perf_counter() - started))
                break
        conn.execute("UNLISTEN *")
        return answers


def ask(dsn: str, command: str, args: Sequence[str] = (), timeout: float = 3.0) -> list[Answer]:
    with Client(dsn) as client:
        return client.ask(command, args, timeout)
