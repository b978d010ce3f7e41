"""Plugins without services: containment, settings, webhook decisions, command runs."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import simplejson as json

from collector import config
from collector.errors import ConfigError
from collector.plugins import Event, Plugin, PluginDispatcher, load_plugins
from tests.helpers import is_alive, wait_for

TOKEN = "tok-5d1e0a7c-secret"


# ---------------------------------------------------------------- helpers
def load(tmp_path: Path, enabled: str, **sections: dict[str, str]) -> list[Plugin]:
    """load_plugins() on a collector.cfg holding ``[plugin:NAME]`` sections."""
    text = "[repository]\ndsn = postgresql://powa@127.0.0.1/powa\n\n"
    text += f"[plugins]\nenabled = {enabled}\n"
    for name, values in sections.items():
        text += f"\n[plugin:{name}]\n"
        # continuation lines of a multi-line value are indented in INI files
        text += "".join(f"{k} = " + v.replace("\n", "\n    ") + "\n" for k, v in values.items())
    path = tmp_path / "collector.cfg"
    path.write_text(text)
    return load_plugins(config.load(path))


def problems(tmp_path: Path, enabled: str, **sections: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, enabled, **sections)
    prefix = f"{tmp_path / 'collector.cfg'}: "
    assert all(p.startswith(prefix) and "\n" not in p for p in caught.value.problems)
    return [p.removeprefix(prefix) for p in caught.value.problems]


def event(**fields: Any) -> Event:
    base: Event = {"srvid": 7, "alias": "db7", "status": "running", "consecutive_failures": 0}
    return {**base, **fields}


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records the posts it accepts.

    ``statuses`` are answered to the first requests (rejected, not recorded);
    every later request gets 200.
    """

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.accepted: list[Post] = []
        self.rejected = 0
        self._statuses = list(statuses)
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"receiver": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook", userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, post: Post) -> int:
        with self._lock:
            if self._statuses:
                self.rejected += 1
                return self._statuses.pop(0)
            self.accepted.append(post)
            return 200

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    receiver: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.receiver.answer(Post(self.path, dict(self.headers), json.loads(body)))
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read what was received, not the access log."""


# ---------------------------------------------------------------- containment
class Recorder(Plugin):
    def __init__(self, name: str = "recorder", settings: dict[str, str] | None = None) -> None:
        super().__init__(name, settings or {})
        self.seen: list[Event] = []
        self.closed = False

    def snapshot_done(self, event: Event) -> None:
        self.seen.append(event)

    def close(self) -> None:
        self.closed = True


class Raiser(Recorder):
    def snapshot_done(self, event: Event) -> None:
        super().snapshot_done(event)
        if len(self.seen) == 1:
            raise RuntimeError("boom in the plugin")
        if len(self.seen) == 2:
            sys.exit(3)


class Blocker(Recorder):
    """Its hook blocks until released: a plugin stuck on a dead endpoint."""

    timeout = 0.2

    def __init__(self) -> None:
        super().__init__("blocker")
        self.started = threading.Event()
        self.release = threading.Event()

    def snapshot_done(self, event: Event) -> None:
        super().snapshot_done(event)
        self.started.set()
        self.release.wait()


@pytest.fixture
def blocker() -> Iterator[Blocker]:
    plugin = Blocker()
    yield plugin
    # ends the runner thread the test left blocked
    plugin.release.set()


def test_a_raising_hook_is_logged_and_later_events_still_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = Raiser("raiser")
    dispatcher = PluginDispatcher([plugin])
    for n in range(3):
        dispatcher.emit("snapshot_done", {"n": n})
    dispatcher.close()
    assert [e["n"] for e in plugin.seen] == [0, 1, 2]
    failures = [
        r for r in caplog.records if r.getMessage() == "plugin raiser failed in snapshot_done"
    ]
    # the exception, then sys.exit(): both logged with their traceback, neither ends the thread
    assert len(failures) == 2
    assert all(r.exc_info for r in failures)
    assert dispatcher.runners[0].failures == 2
    assert plugin.closed


def test_each_plugin_gets_its_own_copy_of_the_event() -> None:
    class Mutator(Recorder):
        def snapshot_done(self, event: Event) -> None:
            event["rows"]["statements"] = -1
            super().snapshot_done(event)

    mutator, recorder = Mutator("mutator"), Recorder()
    dispatcher = PluginDispatcher([mutator, recorder])
    dispatcher.emit("snapshot_done", {"srvid": 1, "rows": {"statements": 10}})
    dispatcher.close()
    assert recorder.seen == [{"srvid": 1, "rows": {"statements": 10}, "kind": "snapshot_done"}]


def test_a_full_queue_drops_and_counts_while_emit_returns(
    blocker: Blocker, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = PluginDispatcher([blocker], queue_size=5)
    dispatcher.emit("snapshot_done", {"n": 0})
    assert blocker.started.wait(10)
    # emit from another thread: were it to block, the test fails instead of hanging

    def emit_more() -> None:
        for n in range(1, 21):
            dispatcher.emit("snapshot_done", {"n": n})

    emitter = threading.Thread(target=emit_more)
    emitter.start()
    emitter.join(10)
    assert not emitter.is_alive()
    runner = dispatcher.runners[0]
    assert runner.dropped == 15
    assert "plugin blocker is not keeping up: 1 event(s) dropped so far" in caplog.messages
    blocker.release.set()
    dispatcher.close(timeout=10)
    assert [e["n"] for e in blocker.seen] == [0, 1, 2, 3, 4, 5]
    # the stop request found room in the full queue: the plugin was closed
    assert blocker.closed


def test_a_hook_that_never_returns_is_reported_hung_and_close_gives_up(
    blocker: Blocker, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = PluginDispatcher([blocker])
    dispatcher.emit("snapshot_done", {"n": 0})
    # no further event comes: the monitor alone must notice
    wait_for(lambda: any("hung?" in m for m in caplog.messages), 10, "the hang reported")
    hung = [m for m in caplog.messages if "hung?" in m]
    assert len(hung) == 1
    assert hung[0].startswith("plugin blocker: snapshot_done has been running for")
    dispatcher.close(timeout=0.5)
    assert "plugin blocker did not finish its events in time" in caplog.messages
    assert not blocker.closed


def test_unknown_event_kinds_are_refused() -> None:
    dispatcher = PluginDispatcher([Recorder()])
    with pytest.raises(ValueError, match="unknown event kind"):
        dispatcher.emit("snapshot_started", {})
    dispatcher.close()


# ---------------------------------------------------------------- loading and settings
def test_webhook_settings_are_validated_without_echoing_secrets(tmp_path: Path) -> None:
    found = problems(tmp_path, "webhook", webhook={
        "url": f"ftp://user:{TOKEN}@example.com/x",
        "timeout": "soon",
        "retries": "-1",
        "failure_threshold": "0",
        "headers": f"Authorization: Bearer {TOKEN}\nnot a header {TOKEN}",
        "token": TOKEN,
    })
    assert found == [
        "[plugin:webhook] url: expected an http:// or https:// URL",
        "[plugin:webhook] timeout: expected a number from 0.1 to 300, got 'soon'",
        "[plugin:webhook] retries: expected an integer from 0 to 10, got '-1'",
        "[plugin:webhook] failure_threshold: expected an integer from 1 to 1000000, got '0'",
        "[plugin:webhook] headers: line 2: expected 'Name: value'",
        "[plugin:webhook] token: unknown key",
    ]
    assert problems(tmp_path, "webhook", webhook={"timeout": "3"}) == [
        "[plugin:webhook] url: missing value"
    ]


def test_command_settings_are_validated(tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    cases = {
        "/nonexistent/alert --now": "'/nonexistent/alert' is not an executable file",
        str(script): f"{str(script)!r} is not an executable file",
        "bin/alert": "'bin/alert': use an absolute path or a name found in PATH",
        "no-such-program-here": "'no-such-program-here' not found in PATH",
        "true 'unclosed": "No closing quotation",
    }
    for command, message in cases.items():
        assert problems(tmp_path, "command", command={"command": command}) == [
            f"[plugin:command] command: {message}"
        ]
    assert problems(tmp_path, "command", command={"command": "true", "events": "snapshot"}) == [
        "[plugin:command] events: unknown event 'snapshot', expected some of: "
        "snapshot_done, snapshot_failed, status_changed"
    ]


def test_a_plugin_that_cannot_be_imported_is_a_config_error(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "nosuch")
    assert found.startswith("[plugins] enabled: cannot load plugin 'nosuch': ImportError: no "
                           "shipped plugin of that name, and no file")
    (found,) = problems(tmp_path, "tests.no_such_module")
    assert found == ("[plugins] enabled: cannot load plugin 'tests.no_such_module': "
                     "ModuleNotFoundError: No module named 'tests.no_such_module'")


def test_plugin_modules_that_break_give_one_line_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "path" / "brokenplugins"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "syntax.py").write_text("def oops(:\n")
    (package / "exits.py").write_text("import sys\nsys.exit(1)\n")
    (package / "two.py").write_text(
        "from collector.plugins import Plugin\nclass A(Plugin): pass\nclass B(Plugin): pass\n"
    )
    (package / "failing.py").write_text(
        "from collector.plugins import Plugin\n"
        "class Failing(Plugin):\n"
        "    def __init__(self, name, settings):\n"
        "        raise RuntimeError('cannot\\nstart')\n"
    )
    monkeypatch.syspath_prepend(str(package.parent))
    found = problems(tmp_path, "brokenplugins.syntax brokenplugins.exits brokenplugins.two "
                               "brokenplugins.failing")
    messages = [p.partition(": ")[2] for p in found]
    # the wording of syntax errors changes with Python versions
    assert messages[0].startswith("cannot load plugin 'brokenplugins.syntax': SyntaxError: ")
    assert messages[1:] == [
        "cannot load plugin 'brokenplugins.exits': SystemExit: 1",
        "cannot load plugin 'brokenplugins.two': ImportError: expected one subclass of "
        "collector.plugins.Plugin, found 2",
        "plugin failed to start: RuntimeError: cannot start",
    ]
    assert found[3].startswith("[plugin:brokenplugins.failing]: ")


def test_configured_but_not_enabled_plugins_are_not_loaded(tmp_path: Path) -> None:
    assert load(tmp_path, "", webhook={"url": "not even a url"}) == []


# ---------------------------------------------------------------- webhook decisions
@pytest.fixture
def webhook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Plugin, list[Event]]:
    (plugin,) = load(tmp_path, "webhook", webhook={"url": "https://alerts.example.com/powa"})
    sent: list[Event] = []
    monkeypatch.setattr(plugin, "send", sent.append)
    return plugin, sent


def test_webhook_notifies_transitions_not_every_snapshot(
    webhook: tuple[Plugin, list[Event]],
) -> None:
    plugin, sent = webhook
    plugin.snapshot_done(event())
    plugin.status_changed(event(status="no connection to remote server",
                                previous_status="running"))
    for failures in (1, 2, 3, 4, 5):  # the default failure_threshold is 3
        plugin.snapshot_failed(event(consecutive_failures=failures))
    plugin.status_changed(event(status="running", previous_status="no connection to remote server"))
    plugin.snapshot_done(event())
    plugin.snapshot_done(event())
    # re-armed after recovery
    for failures in (1, 2, 3):
        plugin.snapshot_failed(event(consecutive_failures=failures))
    assert [(e["notification"], e.get("consecutive_failures")) for e in sent] == [
        ("status_changed", 0),
        ("failures_threshold", 3),
        ("status_changed", 0),
        ("recovered", 0),
        ("failures_threshold", 3),
    ]
    assert sent[0]["previous_status"] == "running"
    assert sent[0]["status"] == "no connection to remote server"


def test_webhook_alerts_once_even_when_the_crossing_event_was_dropped(
    webhook: tuple[Plugin, list[Event]],
) -> None:
    plugin, sent = webhook
    for failures in (1, 5, 6):
        plugin.snapshot_failed(event(consecutive_failures=failures))
    assert [(e["notification"], e["consecutive_failures"]) for e in sent] == [
        ("failures_threshold", 5)
    ]


# ---------------------------------------------------------------- webhook delivery
def webhook_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, **settings: str
) -> tuple[Plugin, list[float]]:
    (plugin,) = load(tmp_path, "webhook", webhook={"url": url, "timeout": "5", **settings})
    delays: list[float] = []
    monkeypatch.setattr(plugin, "sleep", delays.append)
    return plugin, delays


def test_webhook_posts_json_with_headers_after_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with Receiver(statuses=[500, 503]) as receiver:
        plugin, delays = webhook_to(
            tmp_path, monkeypatch, receiver.url(f"/hook/{TOKEN}"),
            headers=f"Authorization: Bearer {TOKEN}\nX-Team: dba",
        )
        plugin.status_changed(event(previous_status="no connection to remote server"))
    (post,) = receiver.accepted
    assert receiver.rejected == 2
    assert post.path == f"/hook/{TOKEN}"
    assert post.headers["Authorization"] == f"Bearer {TOKEN}"
    assert post.headers["X-Team"] == "dba"
    assert post.headers["Content-Type"] == "application/json"
    assert post.body == {**event(previous_status="no connection to remote server"),
                         "notification": "status_changed"}
    # exponential backoff between the attempts
    assert len(delays) == 2 and delays[1] > delays[0]
    assert "HTTP Error 500" in caplog.text
    assert TOKEN not in caplog.text


def test_webhook_drops_after_the_last_retry_and_never_follows_redirects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with Receiver(statuses=[302, 500, 404]) as receiver:
        plugin, delays = webhook_to(tmp_path, monkeypatch, receiver.url(), retries="2",
                                    headers=f"X-Token: {TOKEN}")
        plugin.status_changed(event())
        assert receiver.accepted == []
        assert receiver.rejected == 3
        assert len(delays) == 2
    dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(dropped) == 1
    assert "status_changed notification of server 7 dropped after 3 attempt(s)" in (
        dropped[0].getMessage()
    )
    assert TOKEN not in caplog.text


def test_webhook_url_credentials_become_basic_auth_and_stay_out_of_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with Receiver(statuses=[500]) as receiver:
        plugin, _ = webhook_to(tmp_path, monkeypatch, receiver.url(userinfo=f"powa:{TOKEN}@"))
        plugin.status_changed(event())
    (post,) = receiver.accepted
    assert post.headers["Authorization"] == "Basic " + base64.b64encode(
        f"powa:{TOKEN}".encode()
    ).decode()
    assert "attempt 1 of 4 failed" in caplog.text
    assert TOKEN not in caplog.text


# ---------------------------------------------------------------- command
def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_command_gets_the_event_on_stdin_for_its_events_only(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    append = script(tmp_path, "append.sh", 'cat >> "$1"\n')
    (plugin,) = load(tmp_path, "command", command={"command": f"{append} {out}"})
    plugin.snapshot_done(event())  # not in the default events
    plugin.status_changed(event(kind="status_changed", alias="it's $(rm -rf /)"))
    plugin.snapshot_failed(event(kind="snapshot_failed", consecutive_failures=1))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["kind"], e["alias"]) for e in lines] == [
        ("status_changed", "it's $(rm -rf /)"), ("snapshot_failed", "db7"),
    ]


def test_command_failure_is_logged_with_a_bounded_stderr_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = script(tmp_path, "fail.sh", "head -c 20000 /dev/zero | tr '\\0' x >&2\n"
                                          "echo 'the real reason' >&2\nexit 3\n")
    (plugin,) = load(tmp_path, "command", command={"command": str(failing),
                                                   "events": "snapshot_done"})
    plugin.snapshot_done(event())
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert message.startswith("plugin command: fail.sh exited with status 3 for snapshot_done")
    assert message.endswith("the real reason'")
    assert len(message) < 2200


def test_command_past_its_timeout_is_killed_with_its_children(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "child.pid"
    hanging = script(tmp_path, "hang.sh", f"sleep 300 &\necho $! > {pid_file}\n"
                                          "echo 'waiting forever' >&2\nwait\n")
    (plugin,) = load(tmp_path, "command", command={"command": str(hanging), "timeout": "1"})
    plugin.status_changed(event())
    child = int(pid_file.read_text())
    wait_for(lambda: not is_alive(child) or _zombie(child), 10, "the child killed")
    assert any(m.startswith("plugin command: hang.sh still running after 1s for status_changed,"
                            " killed") and "waiting forever" in m for m in caplog.messages)


def _zombie(pid: int) -> bool:
    """A killed child of an exited shell waits for init to reap it: dead all the same."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def test_command_runs_with_the_environment_of_the_worker_only(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    dump = script(tmp_path, "env.sh", f"env > {out}\n")
    (plugin,) = load(tmp_path, "command", command={"command": str(dump)})
    plugin.status_changed(event(alias="SECRET_ALIAS"))
    assert "SECRET_ALIAS" not in out.read_text()
    assert f"PATH={os.environ['PATH']}" in out.read_text()


def test_a_background_child_holding_stderr_leaves_no_thread_or_descriptor(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "child.pid"
    leaving = script(tmp_path, "leave.sh", f"sleep 300 &\necho $! >> {pid_file}\n"
                                           "echo 'left a child' >&2\nexit 0\n")
    (plugin,) = load(tmp_path, "command", command={"command": str(leaving)})
    # a thread left by an earlier test may end meanwhile: only new ones count
    threads, fds = set(threading.enumerate()), len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(3):
            plugin.status_changed(event())
        assert len(pid_file.read_text().split()) == 3
        assert set(threading.enumerate()) <= threads
        assert len(os.listdir("/proc/self/fd")) <= fds
    finally:
        for pid in pid_file.read_text().split():
            os.kill(int(pid), signal.SIGKILL)
