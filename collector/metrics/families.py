"""Prometheus metric families made of one ``Reading`` (see docs/metrics.md for the list).

Status documents and the program table are JSON anyone with access to Redis
could have written: every value is checked for its type, free text never
becomes a label except the alias (cut short; prometheus_client escapes label
values), and label values that are this program's own words are limited to
the known ones, so a stray value cannot multiply series.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from collector import counters
from collector.keys import (
    STATUS_NO_REMOTE,
    STATUS_NO_REPOSITORY,
    STATUS_RUNNING,
    STATUS_STOPPED,
    STATUS_STOPPING,
)
from collector.metrics.reading import Reading

NS = "powa_fleet"
SERVER = ("srvid", "alias")
STATUSES = (STATUS_RUNNING, STATUS_STOPPING, STATUS_STOPPED, STATUS_NO_REMOTE,
            STATUS_NO_REPOSITORY)
#: a status this version does not know (a newer worker's) counts as this
OTHER = "other"
OUTCOMES = ("ok", "errors", "failed")
#: supervisord's process states
STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")
RELOAD_OUTCOMES = ("ok", "error")
ALIAS_LIMIT = 100

#: gauges of a status document: (name, field, help); times are ISO 8601 text
GAUGES = (
    ("last_snapshot_start_timestamp_seconds", "last_snapshot_start",
     "Start of the server's last snapshot (Unix time)."),
    ("last_snapshot_duration_seconds", "last_snapshot_duration",
     "Duration of the server's last snapshot."),
    ("last_snapshot_rows", "last_snapshot_rows",
     "Rows the server's last snapshot copied."),
    ("consecutive_failures", "consecutive_failures",
     "Snapshots of the server that failed in a row (0 after a stored one)."),
    ("snapshot_in_progress", "snapshot_in_progress",
     "1 while a snapshot of the server runs."),
    ("next_snapshot_due_timestamp_seconds", "next_snapshot_due",
     "When the server's next snapshot is due (Unix time)."),
    ("last_error_timestamp_seconds", "last_error_at",
     "When the worker last recorded an error (Unix time)."),
    ("frequency_seconds", "frequency",
     "The server's snapshot period (powa_servers.frequency)."),
    ("worker_start_timestamp_seconds", "started_at",
     "When the server's worker process started (Unix time)."),
    ("status_updated_timestamp_seconds", "updated_at",
     "When the worker last wrote its status (Unix time)."),
)


def redis_down() -> Iterator[Metric]:
    yield _redis_up(0)


def families(reading: Reading) -> Iterator[Metric]:
    yield _redis_up(1)
    yield from servers(reading)
    yield from fleet(reading)
    yield from requests(reading)


def _redis_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_redis_up", "1 when Redis answered this scrape, else 0 "
                             "(and no other series).", value=value)


# ---------------------------------------------------------------- per server
def servers(reading: Reading) -> Iterator[Metric]:
    status = GaugeMetricFamily(f"{NS}_server_status", "1 for the status the server's worker "
                               "reports, 0 for the others.", labels=[*SERVER, "status"])
    snapshots = CounterMetricFamily(f"{NS}_snapshots", "Snapshots taken by the server's "
                                    "worker since it started: ok (stored, maybe with source "
                                    "errors) or failed.", labels=[*SERVER, "outcome"])
    outcome = GaugeMetricFamily(f"{NS}_last_snapshot_outcome", "1 for the outcome of the "
                                "server's last snapshot (ok, errors: stored with errors, "
                                "failed), 0 for the others.", labels=[*SERVER, "outcome"])
    gauges = [GaugeMetricFamily(f"{NS}_{name}", text, labels=list(SERVER))
              for name, _, text in GAUGES]
    for srvid, document in reading.documents.items():
        labels = [str(srvid), _alias(document.get("alias"))]
        _one_of(status, labels, _known(document.get("status"), STATUSES), (*STATUSES, OTHER))
        for name in ("ok", "failed"):
            count = _number(document.get(f"snapshots_{name}"))
            if count is not None:
                snapshots.add_metric([*labels, name], count)
        last = document.get("last_snapshot_outcome")
        if last in OUTCOMES:
            _one_of(outcome, labels, last, OUTCOMES)
        for family, (_, key, _) in zip(gauges, GAUGES, strict=True):
            value = _value(document.get(key))
            if value is not None:
                family.add_metric(labels, value)
    yield from (status, snapshots, outcome, *gauges)


# ---------------------------------------------------------------- per fleet
def fleet(reading: Reading) -> Iterator[Metric]:
    by_status = Counter(_known(d.get("status"), STATUSES) for d in reading.documents.values())
    workers = GaugeMetricFamily(f"{NS}_workers", "Workers with a status in Redis, by status.",
                                labels=["status"])
    for name in (*STATUSES, OTHER):
        workers.add_metric([name], by_status[name])
    yield workers
    states = {name: _known(state.get("state"), STATES, "UNKNOWN") for name, state in
              reading.programs.items()}
    program = GaugeMetricFamily(f"{NS}_program_state", "1 for each program of supervisord, "
                                "labelled with its current state.", labels=["program", "state"])
    for name, state in sorted(states.items()):
        program.add_metric([name, state], 1)
    yield program
    by_state = Counter(states.values())
    programs = GaugeMetricFamily(f"{NS}_programs", "Programs of supervisord, by state.",
                                 labels=["state"])
    for name in STATES:
        programs.add_metric([name], by_state[name])
    yield programs
    yield GaugeMetricFamily(f"{NS}_program_table_current", "1 while the event listener keeps "
                            "the program table in Redis current.",
                            value=int(reading.programs_current))


# ---------------------------------------------------------------- the control's counters
def requests(reading: Reading) -> Iterator[Metric]:
    total = CounterMetricFamily(f"{NS}_notify_requests", "NOTIFY requests the control "
                                "served, by command and outcome.", labels=["command", "outcome"])
    commands = (*counters.COMMANDS, counters.OTHER)
    for (command, outcome), count in _labelled(counters.decode_counts(reading.requests), 2):
        if command in commands and outcome in counters.OUTCOMES:
            total.add_metric([command, outcome], count)
    yield total
    yield _histogram(f"{NS}_notify_answer_seconds", "Time from reading a NOTIFY request to "
                     "answering it.", "command", reading.answer_seconds,
                     bounds=counters.ANSWER_BUCKETS, known=commands)
    yield _histogram(f"{NS}_reload_duration_seconds", "Duration of the control's reloads "
                     "(_count: how many), by outcome.", "outcome", reading.reload_seconds,
                     bounds=counters.RELOAD_BUCKETS, known=RELOAD_OUTCOMES)


def _histogram(name: str, text: str, label: str, raw: dict[bytes, bytes], *,
               bounds: Sequence[float], known: Sequence[str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text, labels=[label])
    for labels, (buckets, total) in sorted(counters.decode_histogram(raw, bounds).items()):
        if len(labels) == 1 and labels[0] in known:
            family.add_metric(list(labels), [(counters.bound(le), n) for le, n in buckets], total)
    return family


def _labelled(found: dict[tuple[str, ...], float],
              size: int) -> list[tuple[tuple[str, ...], float]]:
    return sorted((labels, n) for labels, n in found.items() if len(labels) == size)


# ---------------------------------------------------------------- values
def _one_of(family: GaugeMetricFamily, labels: list[str], current: str,
            choices: Sequence[str]) -> None:
    for choice in choices:
        family.add_metric([*labels, choice], int(choice == current))


def _known(value: object, choices: Sequence[str], other: str = OTHER) -> str:
    """``value`` if one of ``choices``; ``other`` for any other value, "" for none."""
    if isinstance(value, str) and value in choices:
        return value
    return other if value else ""


def _alias(value: object) -> str:
    return value[:ALIAS_LIMIT] if isinstance(value, str) else ""


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _value(value: Any) -> float | None:
    """A gauge's value: a number, a boolean, or an ISO 8601 time (as Unix time)."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return _number(value)
