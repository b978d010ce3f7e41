"""The operator CLI: status table and protocol requests, with exit codes scripts rely on."""

from __future__ import annotations

import subprocess

import simplejson as json

from tests.conftest import Supervisord
from tests.helpers import PYTHON, ROOT, Fleet, Repo, wait_for

WORKERS = ("worker_1", "worker_2", "worker_3")


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "collector", "-c", str(fleet.cfg_path), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)


def test_status_and_notify(fleet: Fleet, repo: Repo, supervisord: Supervisord) -> None:
    for srvid in repo.srvids:
        repo.due_in(srvid, 4, frequency=30)
    supervisord.ctl("restart", "all")
    supervisord.wait_running("control", *WORKERS)
    wait_for(lambda: all(repo.snapshots(s) >= 1 for s in repo.srvids), 20, "snapshots")
    wait_for(lambda: cli(fleet, "status").returncode == 0, 10, "every worker running")
    table = cli(fleet, "status").stdout.splitlines()
    assert table[0].split()[:4] == ["id", "alias", "program", "status"]
    assert len(table) == 4
    assert all("RUNNING" in line and "running" in line for line in table[1:])
    assert "remote 1" in table[1]
    rows = json.loads(cli(fleet, "status", "--json").stdout)
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert all(r["outcome"] == "ok" for r in rows)

    answer = cli(fleet, "notify", "WORKERS_STATUS")
    assert answer.returncode == 0
    status, data = answer.stdout.strip().split(" ", 1)
    assert status == "OK"
    assert json.loads(data) == {"1": "running", "2": "running", "3": "running"}
    bogus = cli(fleet, "notify", "BOGUS")
    assert bogus.returncode == 1
    assert bogus.stdout.startswith("UNKNOWN ")

    supervisord.ctl("stop", "worker_2")
    stopped = cli(fleet, "status")
    assert stopped.returncode == 1
    assert "STOPPED" in stopped.stdout.splitlines()[2]
    one = cli(fleet, "status", "2")
    assert one.returncode == 1
    assert len(one.stdout.splitlines()) == 2
    assert cli(fleet, "status", "1").returncode == 0
    assert cli(fleet, "status", "9").returncode == 1

    supervisord.ctl("stop", "control")
    silent = cli(fleet, "notify", "WORKERS_STATUS", "--timeout", "1")
    assert silent.returncode == 5
    assert "no answer" in silent.stderr


def test_cli_without_supervisord_says_it_cannot_tell(fleet: Fleet, repo: Repo) -> None:
    assert fleet.generate().returncode == 0
    result = cli(fleet, "status")
    assert result.returncode == 5
    assert result.stdout.count("unknown: supervisord unavailable") == 3
