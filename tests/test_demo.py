"""make demo, headless: everything runs, snapshots arrive, and nothing is left after."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from collector import config
from collector.demo import sandbox
from tests.helpers import PYTHON, ROOT, wait_for, web_states, web_ui


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    with sandbox.workspace("powa-fleet-demo-test-") as base:
        yield base / "demo"


def leftovers(directory: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True,
                           check=False)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def test_demo_runs_headless_and_stops_cleanly(demo_dir: Path) -> None:
    process = subprocess.Popen(
        [PYTHON, "-m", "collector.demo", "--dir", str(demo_dir), "--frequency", "5",
         "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        ui = wait_for(lambda: next((line for line in lines if "web UI" in line), None), 120,
                      "the demo's instructions")
        match = re.search(r"http://127\.0\.0\.1:(\d+)/\s+user (\S+), password (\S+)", ui)
        assert match, ui
        port, user, password = int(match.group(1)), match.group(2), match.group(3)
        cfg = config.load(demo_dir / "collector.cfg")
        assert cfg.supervisor.password == password
        assert web_ui(port, None)[0] == 401

        def all_running() -> bool:
            code, page = web_ui(port, (user, password))
            expected = {"control", "programs", "redis", "spawner", "workload", "worker_1",
                        "worker_2", "worker_3"}
            return code == 200 and web_states(page) == dict.fromkeys(expected, "running")

        wait_for(all_running, 60, "every program RUNNING in the web UI")
        with psycopg.connect(cfg.repository.dsn, autocommit=True) as conn:
            wait_for(lambda: conn.execute(
                "SELECT bool_and(coalesce_seq - 1 >= 2) FROM powa_snapshot_metas WHERE srvid > 0"
            ).fetchone()[0], 40, "two snapshots of every remote")  # type: ignore[index]
        status = subprocess.run(
            [PYTHON, "-m", "collector", "-c", str(demo_dir / "collector.cfg"), "status"],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        rows = status.stdout.strip().splitlines()[1:]
        assert len(rows) == 3
        assert all("RUNNING" in row and "running" in row for row in rows), status.stdout
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
    assert process.returncode == 0, "".join(lines)
    assert any("nothing of it is running" in line for line in lines)
    assert leftovers(demo_dir) == []
