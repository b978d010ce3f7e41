"""The metrics endpoint, scraped by a real Prometheus (Debian's ``prometheus`` package).

Prometheus runs on a free loopback port with a 1 s scrape interval, its data
in a directory of the test; what its HTTP API answers is what an operator's
dashboards and alerts would see.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import simplejson as json

from collector.cli.client import Client
from collector.demo import sandbox
from collector.keys import dumps, iso
from tests.conftest import start_supervisord
from tests.helpers import PYTHON, ROOT, Fleet, Repo, stop_process, wait_for

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).exists(),
                                reason="Debian's prometheus package is not installed")


@dataclass
class Prometheus:
    port: int

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query: {labels (but the name, job and instance): value}."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return {
            tuple(sorted((k, v) for k, v in item["metric"].items()
                         if k not in ("__name__", "job", "instance"))): float(item["value"][1])
            for item in answer["data"]["result"]
        }

    def value(self, promql: str) -> float | None:
        """The value of a query giving one series, None while it gives none."""
        found = self.query(promql)
        assert len(found) <= 1, found
        return next(iter(found.values()), None)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Start a Prometheus scraping 127.0.0.1:<port> every second; stopped and removed after."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(target: int) -> Prometheus:
        directory = tmp_path / f"prometheus{len(started)}"
        directory.mkdir()
        (directory / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: powa-fleet\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
        )
        port = sandbox.free_port()
        log = (directory / "prometheus.log").open("ab")
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        started.append((process, directory))
        wait_for(lambda: ready(port), 60, "Prometheus ready")
        return Prometheus(port)

    yield start
    for process, directory in started:
        stop_process(process)
        shutil.rmtree(directory, ignore_errors=True)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def scrape(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.status, response.read().decode()


def promtool_accepts(exposition: str) -> None:
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, text=True,
                             capture_output=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def ask(repo: Repo, command: str, *args: str, timeout: float = 5.0) -> tuple[str, str]:
    with Client(repo.dsn) as client:
        answers = client.ask(command, args, timeout=timeout)
    assert len(answers) == 1, f"no answer to {command} {args}"
    return answers[0].status, answers[0].data


def settled(fleet: Fleet, srvid: int) -> dict[str, Any] | None:
    """The status document of a server once a snapshot of it is done."""
    document = fleet.status(srvid)
    if document and document.get("snapshots_ok") and not document["snapshot_in_progress"]:
        return document
    return None


def test_prometheus_sees_servers_programs_and_requests(
    fleet: Fleet, repo: Repo, prometheus: Callable[[int], Prometheus]
) -> None:
    port = sandbox.free_port()
    fleet.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    assert fleet.generate().returncode == 0
    supervisord = start_supervisord(fleet)
    try:
        supervisord.wait_running("control", "metrics", "worker_1", "worker_2", "worker_3")
        server = prometheus(port)
        wait_for(lambda: server.value('powa_fleet_server_status{srvid="2",status="running"}'),
                 30, "worker_2 running, as Prometheus sees it")
        assert wait_for(lambda: ask(repo, "FORCE_SNAPSHOT", "2")[0] == "OK", 20,
                        "a forced snapshot of server 2")
        document = wait_for(lambda: settled(fleet, 2), 60, "the forced snapshot done")
        alias = '{srvid="2",alias="remote 2"}'
        wait_for(lambda: server.value(f"powa_fleet_snapshots_total{alias[:-1]},outcome=\"ok\"}}")
                 == document["snapshots_ok"], 20, "the snapshot counted in Prometheus")
        assert server.value(f"powa_fleet_last_snapshot_duration_seconds{alias}") \
            == document["last_snapshot_duration"]
        assert server.value(f"powa_fleet_last_snapshot_rows{alias}") \
            == document["last_snapshot_rows"] > 0
        assert server.value(f"powa_fleet_consecutive_failures{alias}") \
            == document["consecutive_failures"] == 0
        outcome = server.query(f"powa_fleet_last_snapshot_outcome{alias} == 1")
        assert [dict(labels)["outcome"] for labels in outcome] == \
            [document["last_snapshot_outcome"]]
        assert server.value('powa_fleet_workers{status="running"}') == 3

        supervisord.ctl("stop", "worker_3")
        stopped = {(("program", "worker_3"), ("state", "STOPPED")): 1.0}
        wait_for(lambda: server.query('powa_fleet_program_state{program="worker_3"}') == stopped,
                 20, "worker_3 STOPPED in Prometheus")
        wait_for(lambda: server.value('powa_fleet_programs{state="STOPPED"}') == 1, 20,
                 "one program stopped")

        assert ask(repo, "RELOAD", timeout=10) == ("OK", "OK")
        wait_for(lambda: server.value('powa_fleet_reload_duration_seconds_count{outcome="ok"}'),
                 20, "the reload counted")
        wait_for(lambda: (server.value('powa_fleet_notify_requests_total'
                                       '{command="FORCE_SNAPSHOT",outcome="ok"}') or 0) >= 1,
                 20, "FORCE_SNAPSHOT counted")
        answered = server.value('powa_fleet_notify_answer_seconds_count{command="FORCE_SNAPSHOT"}')
        assert answered is not None and answered >= 1
        status, exposition = scrape(port)
        assert status == 200
        promtool_accepts(exposition)
    finally:
        supervisord.stop()


def test_redis_down_still_answers_with_redis_up_zero(
    tmp_path: Path, prometheus: Callable[[int], Prometheus]
) -> None:
    redis_server = sandbox.RedisServer()
    redis_server.start()
    port = sandbox.free_port()
    cfg = tmp_path / "collector.cfg"
    cfg.write_text(f"[repository]\ndsn = postgresql://powa@127.0.0.1:1/powa\n\n"
                   f"[redis]\nurl = {redis_server.url}\nprefix = down\n\n"
                   f"[metrics]\nlisten = 127.0.0.1:{port}\n")
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("down:worker:5", dumps({"srvid": 5, "alias": "five", "status": "running",
                                           "snapshots_ok": 2, "updated_at": iso(0)}))
    log = (tmp_path / "metrics.log").open("ab")
    process = subprocess.Popen([PYTHON, "-m", "collector.metrics", "-c", str(cfg)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    log.close()
    try:
        sandbox.wait_for_port("127.0.0.1", port, 30)
        server = prometheus(port)
        wait_for(lambda: server.value('powa_fleet_snapshots_total{srvid="5"}') == 2, 20,
                 "server 5 in Prometheus")
        redis_server.stop()
        status, exposition = scrape(port)
        assert status == 200
        samples = [line for line in exposition.splitlines() if not line.startswith("#")]
        assert samples == ["powa_fleet_redis_up 0.0"]
        promtool_accepts(exposition)
        wait_for(lambda: server.value("powa_fleet_redis_up") == 0, 20, "Redis down, as seen")
        assert server.value("up") == 1
        assert server.query('powa_fleet_snapshots_total{srvid="5"}') == {}
    finally:
        stop_process(process)
        redis_server.stop()
    assert "Traceback" not in (tmp_path / "metrics.log").read_text()
