"""The operator CLI: status table and protocol requests, with exit codes scripts rely on."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import simplejson as json

from collector import config
from collector.cli.status import RepositoryFacts, current_error, row, table
from collector.control.board import DISABLED, WorkerView
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
    assert table[0].split()[:5] == ["id", "alias", "host", "program", "status"]
    assert len(table) == 4
    assert all("RUNNING" in line and "running" in line for line in table[1:])
    assert "remote 1" in table[1]
    rows = json.loads(cli(fleet, "status", "--json").stdout)
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert all(r["outcome"] == "ok" for r in rows)
    name = config.load(fleet.cfg_path).fleet.host
    assert {r["host"] for r in rows} == {name}

    # the fleet's hosts: this one alone, leading (once its control listens and its
    # next heartbeat says so), collecting the three servers
    def leading() -> list[dict[str, Any]] | None:
        listed = cli(fleet, "hosts", "--json")
        hosts = json.loads(listed.stdout) if listed.returncode == 0 else []
        return hosts if hosts and all(h["leader"] for h in hosts) else None

    (host,) = wait_for(leading, 20, "this host live and leading")
    assert (host["host"], host["leader"], host["share"]) == (name, True, 3)
    assert host["directory"] == str(fleet.directory)
    assert 0 <= host["heartbeat"] < 15

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
    # options after the command too, and supervisorctl with this fleet's -c
    after = subprocess.run([PYTHON, "-m", "collector", "status", "2", "--json", "-c",
                            str(fleet.cfg_path)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert json.loads(after.stdout)[0]["program"] == "STOPPED"
    ctl = cli(fleet, "ctl", "status")
    assert "worker_1" in ctl.stdout
    assert "STOPPED" in [line.split()[1] for line in ctl.stdout.splitlines()
                         if line.startswith("worker_2")]

    supervisord.ctl("stop", "control")
    silent = cli(fleet, "notify", "WORKERS_STATUS", "--timeout", "1")
    assert silent.returncode == 5
    assert "no answer" in silent.stderr


def test_cli_without_supervisord_says_it_cannot_tell(fleet: Fleet, repo: Repo) -> None:
    assert fleet.generate().returncode == 0
    assert cli(fleet, "generate", "--disable", "2").returncode == 0
    once = cli(fleet, "once", "1")
    assert once.returncode == 0, once.stderr
    assert once.stdout.startswith("worker_1: snapshot stored")
    snapts = repo.one("SELECT snapts FROM powa_snapshot_metas WHERE srvid = 1")

    result = cli(fleet, "status")
    assert result.returncode == 5
    # the enabled ones cannot be told; the disabled one is known from its symlink
    assert result.stdout.count("unknown: supervisord unavailable") == 2
    lines = result.stdout.splitlines()
    assert "disabled" in lines[2]
    # no worker ever published: aliases and the last snapshot come from the repository
    assert "remote 1" in lines[1]
    assert snapts.astimezone().strftime("%Y-%m-%d %H:%M:%S") in lines[1]
    assert lines[2].split()[:5] == ["2", "remote", "2", "-", "disabled"]


def view(status: str, document: dict[str, object] | None = None, srvid: int = 1) -> WorkerView:
    return WorkerView(srvid=srvid, enabled=status != DISABLED,
                      program_state=None if status == DISABLED else "RUNNING", pid=None,
                      document=document, status=status)


def test_status_table_shows_whole_statuses_and_tames_aliases() -> None:
    facts = RepositoryFacts(aliases={1: "x" * 80, 2: "evil\x1b[2Jalias"})
    rows = [row(view("no connection to repository server", {"last_error": "boom"}), facts),
            row(view("running", srvid=2), facts)]
    lines = table(rows)
    assert "no connection to repository server" in lines[1]
    assert lines[1].rstrip().endswith("boom")
    assert "x" * 31 + "…" in lines[1]
    assert "x" * 33 not in lines[1]
    assert "\x1b" not in "".join(lines)
    assert "evil?[2Jalias" in lines[2]
    assert lines[0].index("status") == lines[1].index("no connection")


def test_last_error_only_while_current() -> None:
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).isoformat()
    before = datetime(2024, 5, 1, 11, 0, tzinfo=UTC).isoformat()
    after = datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC).isoformat()
    old = {"last_error": "remote gone", "last_error_at": before, "last_snapshot_start": start,
           "last_snapshot_outcome": "ok"}
    assert current_error("running", old) is None
    assert current_error("no connection to remote server", old) == "remote gone"
    partial = {**old, "last_error_at": after, "last_snapshot_outcome": "errors"}
    assert current_error("running", partial) == "remote gone"
    reconnected = {**old, "last_error_at": after, "last_snapshot_outcome": "ok"}
    assert current_error("running", reconnected) is None


def test_repository_facts_fill_what_workers_did_not_publish() -> None:
    snapts = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    facts = RepositoryFacts(aliases={3: "db3"}, snapts={3: snapts})
    line = row(view(DISABLED, srvid=3), facts)
    assert line["alias"] == "db3"
    assert line["last snapshot"] == snapts.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    published = row(view("running", {"alias": "new name", "last_snapshot_start":
                                      "2024-06-01T00:00:00+00:00"}, srvid=3), facts)
    assert published["alias"] == "new name"
    assert published["last snapshot"].startswith("2024-06-01") or \
        published["last snapshot"].startswith("2024-05-31")


def test_where_the_configuration_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "collector.cfg"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", etc)
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # from a checkout, its collector.cfg comes last
    assert config.resolve_path(None) == ROOT / "collector.cfg"
    etc.parent.mkdir()
    etc.write_text("")
    assert config.resolve_path(None) == etc
    (work / "collector.cfg").write_text("")
    assert config.resolve_path(None) == work / "collector.cfg"
    monkeypatch.setenv(config.CONFIG_ENV, "from-env.cfg")
    assert config.resolve_path(None) == work / "from-env.cfg"
    assert config.resolve_path("~/given.cfg") == Path.home() / "given.cfg"
