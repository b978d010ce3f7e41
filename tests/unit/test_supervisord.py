"""The supervisord client gives up on a supervisord that does not answer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from collector.errors import SupervisorError
from collector.fleet.supervisord import Supervisor


def test_a_silent_supervisord_times_out_and_the_client_recovers(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(4)
        client = Supervisor(path, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(SupervisorError, match="cannot reach supervisord"):
            client.state()
        assert time.monotonic() - started < 5
        # the failed connection is dropped, not reused: the next call fails the same way
        with pytest.raises(SupervisorError, match="cannot reach supervisord"):
            client.state()
