"""The spawn request's encoding, and the stand-in's signal relay, without processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from collector import spawning
from collector.worker import stub


def test_request_round_trip_keeps_every_byte_of_argv_and_environment() -> None:
    argv = ["-c", "/srv/fleet dir/collector.cfg", "--srvid", "12", "é=x", ""]
    environ = {"A": "1", "EMPTY": "", "WITH_EQUALS": "a=b=c", "UNICODE": "ß"}
    encoded = spawning.encode_request("/srv/fleet dir", argv, environ)
    length = spawning.LENGTH.unpack(encoded[:spawning.LENGTH.size])[0]
    assert length == len(encoded) - spawning.LENGTH.size
    assert spawning.decode_request(encoded[spawning.LENGTH.size:]) == (
        "/srv/fleet dir", argv, environ)


@pytest.mark.parametrize("payload", [b"", b"/cwd", b"/cwd\0x", b"/cwd\x003\0a\0b"])
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        spawning.decode_request(payload)


def test_socket_beside_the_configuration_and_program_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    assert spawning.socket_path(None) is None
    assert spawning.socket_path("/srv/fleet/collector.cfg") == "/srv/fleet/.spawner.sock"
    assert spawning.socket_path("collector.cfg") == str(Path.cwd() / ".spawner.sock")
    monkeypatch.delenv(spawning.ENV_PROGRAM_PID, raising=False)
    assert spawning.program_pid() == os.getpid()
    monkeypatch.setenv(spawning.ENV_PROGRAM_PID, "4242")
    assert spawning.program_pid() == 4242


def test_relay_holds_signals_until_the_worker_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append(("group", pid, sig)))
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(("process", pid, sig)))
    relay = stub.Relay()
    relay.handle(signal.SIGHUP)
    relay.handle(signal.SIGTERM)
    assert sent == []
    relay.started(77)
    relay.handle(signal.SIGUSR1)
    assert sent == [("process", 77, signal.SIGHUP), ("group", 77, signal.SIGTERM),
                    ("process", 77, signal.SIGUSR1)]


def test_no_spawner_means_the_caller_runs_the_worker(tmp_path: Path) -> None:
    config = str(tmp_path / "collector.cfg")
    assert stub.forked(["-c", config, "--srvid", "1"], {}, config) is None
    assert stub.forked(["--srvid", "1"], {}, None) is None
