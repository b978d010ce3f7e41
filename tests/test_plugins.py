"""Plugins in real worker daemons: a webhook endpoint, a command, and plugins that misbehave."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import simplejson as json

from collector.demo import sandbox
from tests.helpers import Fleet, Repo, password_remote, stop_process, wait_for
from tests.unit.test_plugins import Post, Receiver, script

PASSWORD = "Pl4gin-S3cret-pw!"
TOKEN = "hook-token-8c1f2e"

#: test plugin modules, importable as ``fleettest.NAME`` by the worker
TEST_PLUGINS = {
    "raising": '''
from collector.plugins import Event, Plugin

class Raising(Plugin):
    def snapshot_done(self, event: Event) -> None:
        raise RuntimeError("test plugin raising on purpose")
''',
    "sleeping": '''
import threading

from collector.plugins import Event, Plugin

class Sleeping(Plugin):
    timeout = 1.0

    def snapshot_done(self, event: Event) -> None:
        threading.Event().wait()
''',
    "broken": '''
raise RuntimeError("broken on purpose")
''',
}


@pytest.fixture
def test_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleettest package, on the PYTHONPATH the worker processes inherit."""
    package = tmp_path / "pluginpath" / "fleettest"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, source in TEST_PLUGINS.items():
        (package / f"{name}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", str(package.parent))



def notifications(receiver: Receiver) -> list[str]:
    return [post.body["notification"] for post in receiver.accepted]


def test_webhook_receives_the_outage_and_the_recovery(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    remote = cluster_factory(workload=50)
    password_remote(remote, PASSWORD)
    srvid = repo.register(remote, alias="flaky", username="collector",
                          password=PASSWORD)
    repo.due_in(srvid, 1, frequency=5)
    # the first POST is refused: delivered all the same, by a retry
    with Receiver(statuses=[500]) as receiver:
        fleet.write_config(
            plugins={"enabled": "webhook"},
            plugin__webhook={"url": receiver.url(), "failure_threshold": "1",
                             "headers": f"Authorization: Bearer {TOKEN}"},
        )
        worker = fleet.start_worker(srvid)
        # a loaded machine may start the worker after its due time: then it picks a
        # random point of the 5 s period
        wait_for(lambda: repo.snapshots(srvid) >= 1, 30, "a first snapshot")
        remote.stop()
        wait_for(lambda: notifications(receiver) == ["status_changed", "failures_threshold"],
                 30, "the outage notified")
        remote.start()
        wait_for(lambda: len(receiver.accepted) >= 4, 30, "the recovery notified")
        # stopping may add a transition to 'stopping': look at what came before
        posts = receiver.accepted[:4]
        stop_process(worker)
    assert [(p.body["notification"], p.body["kind"]) for p in posts] == [
        ("status_changed", "status_changed"),
        ("failures_threshold", "snapshot_failed"),
        ("status_changed", "status_changed"),
        ("recovered", "snapshot_done"),
    ]
    outage, threshold, back, recovered = (p.body for p in posts)
    assert (outage["previous_status"], outage["status"]) == (
        "running", "no connection to remote server")
    assert (back["previous_status"], back["status"]) == (
        "no connection to remote server", "running")
    assert threshold["consecutive_failures"] == 1
    assert "remote server" in threshold["error"]
    assert recovered["outcome"] in ("ok", "errors")
    for body in (outage, threshold, back, recovered):
        assert body["srvid"] == srvid
        assert body["alias"] == "flaky"
        assert body["time"] and body["host"]
    assert_delivered_safely(posts, receiver, fleet.log(srvid))


def assert_delivered_safely(posts: list[Post], receiver: Receiver, log: str) -> None:
    assert receiver.rejected == 1
    assert "attempt 1 of 4 failed (HTTP Error 500" in log
    for post in posts:
        assert post.headers["Authorization"] == f"Bearer {TOKEN}"
        assert post.headers["Content-Type"] == "application/json"
        assert PASSWORD not in json.dumps(post.body)
    assert TOKEN not in log
    assert PASSWORD not in log


def test_command_receives_each_snapshot_event_on_stdin(
    fleet: Fleet, repo: Repo, tmp_path: Path
) -> None:
    srvid = repo.srvids[1]
    out = tmp_path / "events.jsonl"
    append = script(tmp_path, "append.sh", 'cat >> "$1"\n')
    fleet.write_config(
        plugins={"enabled": "command"},
        plugin__command={"command": f"{shlex.quote(str(append))} {shlex.quote(str(out))}",
                         "events": "snapshot_done"},
    )
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 30,
             "two snapshot events written by the command")
    stop_process(worker)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["snapshots_ok"] for e in events[:2]] == [1, 2]
    for event in events:
        assert event["kind"] == "snapshot_done"
        assert event["srvid"] == srvid
        assert event["alias"] == "remote 2"
        assert event["outcome"] in ("ok", "errors")
        assert sum(event["rows"].values()) > 0


@pytest.mark.usefixtures("test_plugins")
def test_raising_and_hung_plugins_never_stop_the_snapshots(fleet: Fleet, repo: Repo) -> None:
    srvid = repo.srvids[2]
    fleet.write_config(plugins={"enabled": "fleettest.raising fleettest.sleeping"})
    repo.due_in(srvid, 1, frequency=5)
    worker = fleet.start_worker(srvid)
    wait_for(lambda: repo.snapshots(srvid) >= 3, 30, "three snapshots on schedule")
    wait_for(lambda: "hung?" in fleet.log(srvid), 10, "the hung plugin reported")
    document = fleet.status(srvid)
    assert document is not None
    assert document["status"] == "running"
    assert document["snapshots_failed"] == 0
    assert stop_process(worker) == 0
    log = fleet.log(srvid)
    assert "plugin fleettest.raising failed in snapshot_done" in log
    assert "RuntimeError: test plugin raising on purpose" in log
    assert "plugin fleettest.sleeping: snapshot_done has been running for" in log
    assert "plugin fleettest.sleeping did not finish its events in time" in log


@pytest.mark.usefixtures("test_plugins")
def test_broken_or_misconfigured_plugins_stop_the_worker_start(fleet: Fleet, repo: Repo) -> None:
    srvid = repo.srvids[0]
    fleet.write_config(
        plugins={"enabled": "webhook command fleettest.broken nosuch"},
        plugin__webhook={"url": f"gopher://user:{TOKEN}@example.com/", "retris": "3"},
        plugin__command={"command": "/nonexistent/notify --all"},
    )
    result = fleet.run("-m", "collector.worker", "-c", str(fleet.cfg_path),
                       "--srvid", str(srvid), timeout=60)
    assert result.returncode == 2
    where = f"worker_{srvid}: {fleet.cfg_path}:"
    assert result.stderr.splitlines() == [
        f"{where} [plugin:webhook] url: expected an http:// or https:// URL",
        f"{where} [plugin:webhook] retris: unknown key",
        f"{where} [plugin:command] command: '/nonexistent/notify' is not an executable file",
        f"{where} [plugins] enabled: cannot load plugin 'fleettest.broken': "
        "RuntimeError: broken on purpose",
        f"{where} [plugins] enabled: cannot load plugin 'nosuch': "
        "ImportError: no shipped plugin of that name, and no file "
        f"{fleet.directory / 'plugins' / 'nosuch.py'}",
    ]
    assert repo.snapshots(srvid) == 0
