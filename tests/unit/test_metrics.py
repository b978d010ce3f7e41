"""Metrics without services: the [metrics] section, the supervisord program, the counters'
format in Redis, and the families made of what Redis holds (hostile values included)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from collector import config, counters
from collector.errors import ConfigError
from collector.fleet.files import render_supervisord
from collector.metrics.families import families, redis_down
from collector.metrics.reading import Reading

BASE = """
[repository]
dsn = postgresql://powa@127.0.0.1:5432/powa

[supervisor]
http = 127.0.0.1:9001
"""


def load(tmp_path: Path, metrics: str = "") -> config.Config:
    path = tmp_path / "collector.cfg"
    path.write_text(BASE + (f"\n[metrics]\n{metrics}\n" if metrics else ""))
    return config.load(path)


def problems(tmp_path: Path, metrics: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, metrics)
    return caught.value.problems


# ---------------------------------------------------------------- [metrics]
def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    assert not load(tmp_path).metrics.enabled
    assert not load(tmp_path, "listen =").metrics.enabled


@pytest.mark.parametrize(("listen", "address"), [
    ("127.0.0.1:9187", ("127.0.0.1", 9187)),
    ("localhost:9187", ("localhost", 9187)),
    ("[::1]:9187", ("::1", 9187)),
])
def test_loopback_addresses_are_accepted(tmp_path: Path, listen: str,
                                         address: tuple[str, int]) -> None:
    metrics = load(tmp_path, f"listen = {listen}").metrics
    assert metrics.enabled
    assert metrics.address() == address


@pytest.mark.parametrize("listen", ["0.0.0.0:9187", "*:9187", ":9187", "192.0.2.7:9187",
                                    "metrics.example.org:9187", "[::]:9187"])
def test_a_remote_address_needs_allow_remote(tmp_path: Path, listen: str) -> None:
    [problem] = problems(tmp_path, f"listen = {listen}")
    assert "[metrics] listen" in problem
    assert "not a loopback address" in problem and "allow_remote = true" in problem
    allowed = load(tmp_path, f"listen = {listen}\nallow_remote = true").metrics
    assert allowed.enabled and allowed.allow_remote


@pytest.mark.parametrize("listen", ["9187", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
                                    "127.0.0.1:http", "::1:9187", "[::zz]:9187", "a b:9187"])
def test_a_malformed_address_is_one_clear_problem(tmp_path: Path, listen: str) -> None:
    [problem] = problems(tmp_path, f"listen = {listen}")
    assert problem == (f"{tmp_path / 'collector.cfg'}: [metrics] listen: expected host:port"
                       f" (e.g. 127.0.0.1:9187), got {listen!r}")


def test_every_problem_of_the_section_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, "listen = 127.0.0.1:9001\nallow_remote = maybe\nport = 1")
    assert [p.split(": ", 1)[1] for p in found] == [
        "[metrics] port: unknown key",
        "[metrics] allow_remote: expected true or false, got 'maybe'",
        "[metrics] listen: 127.0.0.1:9001 is the address of [supervisor] http",
    ]


def test_the_program_is_generated_only_when_metrics_are_on(tmp_path: Path) -> None:
    off = render_supervisord(load(tmp_path), "/usr/bin/python3", 3)
    assert "[program:metrics]" not in off
    on = render_supervisord(load(tmp_path, "listen = 127.0.0.1:9187"), "/usr/bin/python3", 3)
    section = on.split("[program:metrics]\n", 1)[1].split("\n\n", 1)[0]
    assert f"command = /usr/bin/python3 -m collector.metrics -c {tmp_path / 'collector.cfg'}" \
        in section.splitlines()
    assert f"stdout_logfile = {tmp_path / 'logs' / 'metrics.log'}" in section.splitlines()


# ---------------------------------------------------------------- counters
def test_request_labels_are_our_own_words() -> None:
    assert counters.command_label("WORKERS_STATUS") == "WORKERS_STATUS"
    assert counters.command_label("workers_status") == "other"
    assert counters.command_label("DROP\tTABLE") == "other"
    assert counters.outcome_label(("OK", "{}")) == "ok"
    assert counters.outcome_label(("ERROR", "Permission denied")) == "denied"
    assert counters.outcome_label(("ERROR", "Server id 7 not found")) == "error"
    assert counters.outcome_label(("UNKNOWN", "x")) == "unknown"
    assert counters.outcome_label(("REFUSED", "bad channel")) == "refused"
    assert counters.outcome_label(("WHATEVER", "")) == "error"
    assert counters.outcome_label(None) == "queued"


def test_histogram_buckets_are_cumulative_and_complete() -> None:
    raw = {b"RELOAD\t0.001": b"2", b"RELOAD\t1": b"1", b"RELOAD\t+Inf": b"1",
           b"RELOAD\tsum": b"12.5", b"RELOAD\tbogus": b"3", b"junk": b"x"}
    [(labels, (buckets, total))] = counters.decode_histogram(raw, (0.001, 0.5, 1.0)).items()
    assert labels == ("RELOAD",)
    assert buckets == [(0.001, 2), (0.5, 2), (1.0, 3), (float("inf"), 4)]
    assert total == 12.5
    assert counters.bucket(0.3, (0.1, 0.5)) == "0.5"
    assert counters.bucket(9.0, (0.1, 0.5)) == "+Inf"


def test_a_recorder_without_redis_keeps_its_counts_and_never_raises() -> None:
    recorder = counters.Recorder("redis://127.0.0.1:1/0", "t")
    recorder.request("WORKERS_STATUS", ("OK", "{}"), 0.002)
    recorder.reload("ok", 3.0)
    assert recorder.flush() is False
    assert recorder.flush() is False
    assert recorder.failed_writes == 2
    recorder.redis.close()


# ---------------------------------------------------------------- families
class Fixed:
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def exposed(metrics: Iterable[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(Fixed(metrics))
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_series_of_a_status_document() -> None:
    reading = Reading(documents={2: {
        "srvid": 2, "alias": "db \"two\"\n", "status": "running", "snapshots_ok": 4,
        "snapshots_failed": 1, "last_snapshot_outcome": "errors", "last_snapshot_rows": 120,
        "last_snapshot_duration": 0.25, "last_snapshot_start": "2024-05-01T10:00:00.000+00:00",
        "snapshot_in_progress": False, "last_error": "password=hunter2 failed",
    }}, programs={"worker_2": {"state": "RUNNING"}, "control": {"state": "FATAL"}})
    series = exposed(families(reading))
    server = (("alias", 'db "two"\n'), ("srvid", "2"))
    assert series[("powa_fleet_redis_up", ())] == 1
    assert series[("powa_fleet_snapshots_total", (*server[:1], ("outcome", "ok"), server[1]))] == 4
    assert series[("powa_fleet_last_snapshot_duration_seconds", server)] == 0.25
    assert series[("powa_fleet_last_snapshot_start_timestamp_seconds", server)] == 1714557600
    assert series[("powa_fleet_server_status", (*server, ("status", "running")))] == 1
    assert series[("powa_fleet_server_status", (*server, ("status", "stopped")))] == 0
    assert series[("powa_fleet_program_state", (("program", "control"), ("state", "FATAL")))] == 1
    assert series[("powa_fleet_programs", (("state", "RUNNING"),))] == 1
    assert series[("powa_fleet_workers", (("status", "running"),))] == 1
    assert not any("hunter2" in str(key) for key in series)


def test_hostile_values_in_redis_make_no_series_and_no_error() -> None:
    reading = Reading(
        documents={3: {"alias": ["x"], "status": "pwned" * 100, "snapshots_ok": "many",
                       "last_snapshot_outcome": "great", "last_snapshot_start": "yesterday",
                       "last_snapshot_duration": float("nan"), "last_snapshot_rows": True}},
        programs={"worker_3": {"state": "HACKED"}},
        requests={b"DROP\tok": b"5", b"RELOAD\tqueued": b"-1", b"RELOAD\tok\textra": b"1"},
        reload_seconds={b"maybe\t1": b"1"},
    )
    series = exposed(families(reading))
    server = (("alias", ""), ("srvid", "3"))
    assert series[("powa_fleet_server_status", (*server, ("status", "other")))] == 1
    assert ("powa_fleet_snapshots_total", (("alias", ""), ("outcome", "ok"), ("srvid", "3"))) \
        not in series
    assert ("powa_fleet_last_snapshot_duration_seconds", server) not in series
    assert series[("powa_fleet_program_state", (("program", "worker_3"), ("state", "UNKNOWN")))] \
        == 1
    assert not [key for key in series if key[0].startswith(("powa_fleet_notify_requests",
                                                            "powa_fleet_reload_duration"))]


def test_without_redis_only_the_up_gauge() -> None:
    assert exposed(redis_down()) == {("powa_fleet_redis_up", ()): 0}
