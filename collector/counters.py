"""The control's counters (NOTIFY requests, RELOADs), kept in Redis for the metrics endpoint.

The control process counts every request it serves and every reload it
runs (``record_request``, ``record_reload``); ``collector.metrics`` turns
the counts into Prometheus counters and histograms at scrape time.  Counting
must never slow an answer: ``Recorder`` only adds to a table in memory, and a
thread of its own writes the table to Redis (pipelined, a few writes per
burst of requests).  While Redis is away the counts add up in memory (the
table is small: commands, outcomes and buckets are fixed sets) and are
written when it answers again; the outage is logged once.

Layout in Redis, under the configured prefix (hashes that never expire:
counts survive a restart of the control; a Redis that loses them is a
counter reset, which Prometheus handles):

* ``<prefix>:metrics:requests``: ``"COMMAND<TAB>OUTCOME"`` -> requests;
* ``<prefix>:metrics:answer_seconds``: ``"COMMAND<TAB>LE"`` -> requests
  answered within that bucket (and above the one below: not cumulative),
  ``"COMMAND<TAB>sum"`` -> seconds;
* ``<prefix>:metrics:reload_seconds``: ``"OUTCOME<TAB>LE"`` and
  ``"OUTCOME<TAB>sum"``, the same for reloads.

Label values are this module's own words (request commands are untrusted
text: an unknown one counts as ``other``).
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence

from collector.config import RedisConfig
from collector.keys import client
from collector.logs import Outage
from collector.syncredis import redis

log = logging.getLogger(__name__)

COMMANDS = ("RELOAD", "WORKERS_STATUS", "FORCE_SNAPSHOT", "REFRESH_DB_CAT")
OTHER = "other"
#: outcomes of a request: its answer's status word, or what happened instead
OUTCOMES = ("ok", "error", "unknown", "denied", "refused", "queued")
#: answers are expected in milliseconds; FORCE_SNAPSHOT may wait 1 s for its worker
ANSWER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: a reload of a large fleet waits for snapshots to end
RELOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SEP = "\t"
SUM = "sum"
INF = "+Inf"
#: after a failed write, the next attempt waits this long (counts keep adding up)
RETRY = 5.0


def requests_key(prefix: str) -> str:
    return f"{prefix}:metrics:requests"


def answer_seconds_key(prefix: str) -> str:
    return f"{prefix}:metrics:answer_seconds"


def reload_seconds_key(prefix: str) -> str:
    return f"{prefix}:metrics:reload_seconds"


def command_label(command: str) -> str:
    return command if command in COMMANDS else OTHER


def outcome_label(answer: tuple[str, str] | None) -> str:
    """The outcome of a request from its answer (status, data); None: answered later."""
    if answer is None:
        return "queued"
    status, data = answer
    if status == "ERROR" and data == "Permission denied":
        return "denied"
    return status.lower() if status.lower() in OUTCOMES else "error"


def bound(value: float) -> str:
    """A bucket's ``le`` as Prometheus writes it."""
    return INF if math.isinf(value) else format(float(value), "g")


def bucket(seconds: float, bounds: Sequence[float]) -> str:
    """The ``le`` of the first bucket holding ``seconds``."""
    return next((bound(b) for b in bounds if seconds <= b), INF)


class Recorder(threading.Thread):
    """Counts requests and reloads in memory; writes them to Redis from its own thread."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(name="counters", daemon=True)
        self.redis = client(url, socket_timeout=1.0)
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._sums: dict[tuple[str, str], float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._retry_at = 0.0
        self._outage = Outage(log, "cannot write the control's counters to Redis")
        #: writes that failed (the counts were kept for the next one)
        self.failed_writes = 0

    def request(self, command: str, answer: tuple[str, str] | None, seconds: float) -> None:
        """A request served: its command, its answer (None: answered later), how long it took."""
        command = command_label(command)
        with self._lock:
            self._counts[(requests_key(self.prefix), command + SEP + outcome_label(answer))] += 1
            self._observe(answer_seconds_key(self.prefix), command, seconds, ANSWER_BUCKETS)
        self._wake.set()

    def reload(self, outcome: str, seconds: float) -> None:
        """A reload done (``ok``) or failed (``error``), and how long it took."""
        with self._lock:
            self._observe(reload_seconds_key(self.prefix), outcome, seconds, RELOAD_BUCKETS)
        self._wake.set()

    def _observe(self, key: str, label: str, seconds: float, bounds: Sequence[float]) -> None:
        self._counts[(key, label + SEP + bucket(seconds, bounds))] += 1
        field = (key, label + SEP + SUM)
        self._sums[field] = self._sums.get(field, 0.0) + max(0.0, seconds)

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(RETRY)
            self._wake.clear()
            if time.monotonic() >= self._retry_at:
                self.flush()
        self.flush()

    def flush(self) -> bool:
        """Write what was counted since the last write; on failure keep it for the next."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            sums, self._sums = self._sums, {}
        if not counts and not sums:
            return True
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for (key, name), count in counts.items():
                    pipe.hincrby(key, name, count)
                for (key, name), seconds in sums.items():
                    pipe.hincrbyfloat(key, name, seconds)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._counts.update(counts)
                for field, seconds in sums.items():
                    self._sums[field] = self._sums.get(field, 0.0) + seconds
            self.failed_writes += 1
            self._retry_at = time.monotonic() + RETRY
            self._outage.failed(exc)
            return False
        self._outage.recovered("writing the control's counters to Redis again")
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread after a last write (bounded by the client's timeouts)."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)
        self.redis.close()


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def recorder(settings: RedisConfig) -> Recorder:
    """The process's recorder, made, started and flushed at exit when first asked for.

    One per process, for the Redis settings of its first use: the control
    takes a new [redis] at its restart, and so do its counters.
    """
    global _recorder  # noqa: PLW0603 - one writer thread per process
    with _recorder_lock:
        if _recorder is None:
            _recorder = Recorder(settings.url, settings.prefix)
            _recorder.start()
            atexit.register(close)
        return _recorder


def record_request(settings: RedisConfig, command: str, answer: tuple[str, str] | None,
                   seconds: float) -> None:
    """Count a NOTIFY request (see ``Recorder.request``); never blocks, never raises."""
    try:
        recorder(settings).request(command, answer, seconds)
    except Exception:
        log.exception("cannot count a request")


def record_reload(settings: RedisConfig, outcome: str, seconds: float) -> None:
    """Count a reload (see ``Recorder.reload``); never blocks, never raises."""
    try:
        recorder(settings).reload(outcome, seconds)
    except Exception:
        log.exception("cannot count a reload")


def close() -> None:
    """Write what is left and stop the process's recorder (at exit)."""
    global _recorder
    with _recorder_lock:
        found, _recorder = _recorder, None
    if found is not None:
        found.close()


# ---------------------------------------------------------------- reading (collector.metrics)
Labels = tuple[str, ...]


def decode_counts(raw: Mapping[bytes, bytes]) -> dict[Labels, float]:
    """A counter hash as {label values: count}; malformed fields are skipped."""
    found: dict[Labels, float] = {}
    for name, value in raw.items():
        number = _number(value)
        if number is not None:
            found[tuple(name.decode("utf-8", "replace").split(SEP))] = number
    return found


def decode_histogram(
    raw: Mapping[bytes, bytes], bounds: Sequence[float]
) -> dict[Labels, tuple[list[tuple[float, float]], float]]:
    """A histogram hash as {label values: (cumulative buckets (le, count), sum)}.

    Every standard bucket is listed, empty or not, so each series keeps the
    same buckets from scrape to scrape.
    """
    counts: dict[Labels, dict[float, float]] = {}
    sums: dict[Labels, float] = {}
    for labels, number in decode_counts(raw).items():
        *values, last = labels
        if last == SUM:
            sums[tuple(values)] = number
            continue
        try:
            le = float(last)
        except ValueError:
            continue
        per_bucket = counts.setdefault(tuple(values), {})
        per_bucket[le] = per_bucket.get(le, 0.0) + number
    return {labels: (_cumulative(per_bucket, bounds), sums.get(labels, 0.0))
            for labels, per_bucket in counts.items()}


def _cumulative(per_bucket: Mapping[float, float],
                bounds: Sequence[float]) -> list[tuple[float, float]]:
    total = 0.0
    buckets = []
    for le in sorted({*bounds, *per_bucket, math.inf}):
        total += per_bucket.get(le, 0.0)
        buckets.append((le, total))
    return buckets


def _number(value: bytes) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None
