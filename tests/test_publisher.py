"""The status key of a server: one publisher at a time, handed over with the server's lease."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import simplejson as json

from collector.demo import sandbox
from collector.keys import client, owner_key, status_channel, status_key
from collector.worker.publisher import StatusPublisher
from tests.helpers import wait_for

SRVID = 7


def document(status: str, host: str) -> dict[str, Any]:
    return {"srvid": SRVID, "status": status, "host": host}


def stored(url: str, prefix: str) -> dict[str, Any]:
    with client(url) as connection:
        raw = connection.get(status_key(prefix, SRVID))
    assert raw, "no status stored"
    found: dict[str, Any] = json.loads(raw)
    return found


def publish(publisher: StatusPublisher, status: str) -> None:
    publisher.update(document(status, publisher.host))
    assert publisher._write(force=True)


def test_a_collecting_host_takes_the_status_over_from_another_host_only(
    redis_server: sandbox.RedisServer,
) -> None:
    url, prefix = redis_server.url, "pub-test"
    alpha = StatusPublisher(url, prefix, SRVID, ttl=30, host="alpha")
    beta = StatusPublisher(url, prefix, SRVID, ttl=30, host="beta")
    try:
        publish(alpha, "running")
        assert stored(url, prefix) == {**document("running", "alpha"),
                                       "updated_at": stored(url, prefix)["updated_at"]}
        # beta waiting for the lease does not overwrite the collector's status
        publish(beta, "standby: collected by host alpha")
        assert stored(url, prefix)["host"] == "alpha"
        # beta collects (its lease): the status follows, alpha's key is no longer its own
        publish(beta, "running")
        assert stored(url, prefix)["host"] == "beta"
        publish(alpha, "standby: collected by host beta")
        assert stored(url, prefix)["host"] == "beta"
        # a second worker on the same host never takes over (one of them is a stray)
        with client(url) as connection:
            connection.set(owner_key(prefix, SRVID), "beta/1", ex=30)
        publish(beta, "no connection to remote server")
        publish(beta, "running")
        assert stored(url, prefix)["status"] == "running"
        assert stored(url, prefix)["host"] == "beta"
        with client(url) as connection:
            assert connection.get(owner_key(prefix, SRVID)) == b"beta/1"
    finally:
        # their threads never ran: only their connections to close
        alpha.redis.close()
        beta.redis.close()


def test_a_change_that_may_wait_is_written_once_with_the_next(
    redis_server: sandbox.RedisServer,
) -> None:
    """A snapshot's start (may wait 1 s) and its end a moment later: one write, the end's."""
    url, prefix = redis_server.url, "pub-wait"
    publisher = StatusPublisher(url, prefix, SRVID, ttl=30, host="alpha")
    with client(url) as connection:
        pubsub = connection.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(status_channel(prefix))

        def messages(seconds: float) -> list[dict[str, Any]]:
            found = []
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(timeout=left)
                if message is not None:
                    found.append(json.loads(message["data"]))
            return found

        publisher.start()
        try:
            publisher.update(document("running", "alpha"))
            assert [m["status"] for m in messages(0.5)] == ["running"]
            publisher.update({**document("running", "alpha"), "snapshot_in_progress": True},
                             within=1.0)
            publisher.update({**document("running", "alpha"), "last_snapshot_rows": 3})
            written = messages(1.5)
            assert [m.get("last_snapshot_rows") for m in written] == [3]
            # alone, it waits its time, then is written
            started = time.monotonic()
            publisher.update({**document("running", "alpha"), "snapshot_in_progress": True},
                             within=0.5)
            assert messages(0.3) == []
            written = messages(1.0)
            assert [m.get("snapshot_in_progress") for m in written] == [True]
            assert time.monotonic() - started >= 0.5
        finally:
            publisher.close()
            pubsub.close()


def times_scheduled(thread_id: int) -> int:
    """How many times the kernel ran this thread (its third /proc schedstat field)."""
    return int(Path(f"/proc/self/task/{thread_id}/schedstat").read_text().split()[2])


def test_the_next_start_is_written_without_waking_the_thread(
    redis_server: sandbox.RedisServer,
) -> None:
    """The thread plans to be awake when the next snapshot's start is due: that start
    costs it no wake-up; its end, a moment later, wakes it once for the write."""
    url, prefix = redis_server.url, "pub-expected"
    publisher = StatusPublisher(url, prefix, SRVID, ttl=30, host="alpha")
    with client(url) as connection:
        pubsub = connection.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(status_channel(prefix))

        def next_message(timeout: float) -> dict[str, Any] | None:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                # None for the subscription's confirmation too
                if (message := pubsub.get_message(timeout=left)) is not None:
                    return dict(json.loads(message["data"]))
            return None

        publisher.start()
        try:
            start_due = time.monotonic() + 1.0
            publisher.update(document("running", "alpha"), expected=start_due + 0.5)
            assert (found := next_message(2.0)) and found["status"] == "running"
            assert publisher.native_id is not None
            time.sleep(0.2)
            before = times_scheduled(publisher.native_id)
            time.sleep(max(0.0, start_due - time.monotonic()))
            publisher.update({**document("running", "alpha"), "snapshot_in_progress": True},
                             within=0.5)
            time.sleep(0.2)
            assert times_scheduled(publisher.native_id) == before
            # written when the thread wakes as planned (by the start's time at the latest)
            found = next_message(2.0)
            assert found is not None and found["snapshot_in_progress"] is True
            assert time.monotonic() <= start_due + 0.5 + 1.0
            assert times_scheduled(publisher.native_id) > before
        finally:
            publisher.close()
            pubsub.close()


def test_a_snapshots_end_is_written_by_the_caller_while_redis_answers(
    redis_server: sandbox.RedisServer,
) -> None:
    """write_now() writes in the caller's thread; once Redis stopped answering it hands
    over to the thread at once, instead of holding the caller for a socket timeout."""
    url, prefix = redis_server.url, "pub-inline"
    publisher = StatusPublisher(url, prefix, SRVID, ttl=30, host="alpha")
    publisher.start()
    try:
        publisher.update(document("running", "alpha"))
        assert publisher.written.wait(5)
        assert publisher.native_id is not None
        time.sleep(0.2)
        before = times_scheduled(publisher.native_id)
        publisher.write_now({**document("running", "alpha"), "last_snapshot_rows": 1})
        # in Redis as it returns, and the thread never ran for it
        assert stored(url, prefix)["last_snapshot_rows"] == 1
        assert times_scheduled(publisher.native_id) == before
        assert redis_server.process is not None
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            publisher.update({**document("running", "alpha"), "last_snapshot_rows": 2})
            # the thread's write times out (the client's 2 s), then it backs off
            wait_for(lambda: not publisher._answering, 10, "the thread's write to fail")
            started = time.monotonic()
            publisher.write_now({**document("running", "alpha"), "last_snapshot_rows": 3})
            assert time.monotonic() - started < 0.5
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        # Redis answers again: the thread writes the latest
        wait_for(lambda: stored(url, prefix).get("last_snapshot_rows") == 3, 15,
                 "the latest status to be written")
    finally:
        publisher.close()
