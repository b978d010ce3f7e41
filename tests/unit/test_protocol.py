"""The NOTIFY protocol: parsing like upstream, answers that always fit."""

from __future__ import annotations

import pytest
import simplejson as json
from hypothesis import given
from hypothesis import strategies as st

from collector.control import protocol
from collector.errors import ProtocolError


def test_parse_like_powa_web_sends() -> None:
    # powa-web always puts a space after the channel, even without arguments
    request = protocol.parse("WORKERS_STATUS r123 ", 42)
    assert request == protocol.Request("WORKERS_STATUS", "r123", (), 42)
    assert request.answers
    assert protocol.parse("FORCE_SNAPSHOT r9 3", 1).args == ("3",)
    assert protocol.parse("RELOAD", 1).channel == "-"
    assert not protocol.parse("RELOAD -", 1).answers
    assert protocol.parse("", 1).command == ""


@pytest.mark.parametrize("channel, ok", [
    ("r12345", True), ("-", True), ("Mixed Case", True), ('quo"te', True),
    ("x" * 63, True), ("x" * 64, False), ("é" * 32, False), ("a\0b", False),
])
def test_channel_problem(channel: str, ok: bool) -> None:
    assert (protocol.channel_problem(channel) is None) is ok


def test_force_snapshot_arguments() -> None:
    assert protocol.parse_srvid(("12",)) == 12
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.parse_srvid(())
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.parse_srvid(("1", "2"))
    for bad in ("x", "-1", "²", "1" * 11):
        with pytest.raises(ProtocolError, match="invalid remote server id"):
            protocol.parse_srvid((bad,))


def test_refresh_db_cat_arguments() -> None:
    assert protocol.parse_refresh_db_cat(("3", "2", "db1", "db2")) == (3, ["db1", "db2"])
    assert protocol.parse_refresh_db_cat(("3", "0")) == (3, [])
    with pytest.raises(ProtocolError, match="asked for 2 db, but found 1"):
        protocol.parse_refresh_db_cat(("3", "2", "db1"))
    with pytest.raises(ProtocolError, match="invalid number of databases"):
        protocol.parse_refresh_db_cat(("3", "x"))
    with pytest.raises(ProtocolError, match="malformed"):
        protocol.parse_refresh_db_cat(("3",))


def test_answer_fits_and_keeps_the_command() -> None:
    assert protocol.answer("RELOAD", "OK", "OK") == "RELOAD OK OK"
    long = protocol.answer("X", "UNKNOWN", "é" * 9000)
    assert len(long.encode()) <= protocol.MAX_PAYLOAD
    assert long.startswith("X UNKNOWN ")
    assert long.endswith("...")
    huge_command = protocol.answer("C" * 9000, "UNKNOWN", "data")
    assert len(huge_command.encode()) <= protocol.MAX_PAYLOAD


def test_workers_status_small_fleet_is_plain() -> None:
    text = protocol.workers_status_json({2: "running", 1: "stopped"}, 7000)
    assert json.loads(text) == {"1": "stopped", "2": "running"}


def test_workers_status_large_fleet_puts_problems_first_and_counts_the_rest() -> None:
    statuses = {i: "running" for i in range(1, 2001)}
    statuses[1500] = "no connection to remote server"
    statuses[7] = "stopped"
    text = protocol.workers_status_json(statuses, 7900)
    assert len(text.encode()) <= 7900
    decoded = json.loads(text)
    keys = list(decoded)
    assert keys[:2] == ["7", "1500"]
    shown = len(decoded) - 1
    assert decoded[protocol.OMITTED_KEY] == 2000 - shown
    assert shown > 100


@given(st.dictionaries(st.integers(1, 10**6), st.sampled_from(
    ["running", "stopped", "no connection to remote server", "stuck: x", "é" * 40]),
    max_size=3000), st.integers(50, 7999))
def test_workers_status_always_fits_and_is_valid_json(statuses: dict[int, str], room: int) -> None:
    text = protocol.workers_status_json(statuses, room)
    decoded = json.loads(text)
    if len(json.dumps({str(k): v for k, v in statuses.items()}).encode()) <= room:
        assert decoded == {str(k): v for k, v in statuses.items()}
    else:
        assert len(text.encode()) <= room
        assert decoded[protocol.OMITTED_KEY] == len(statuses) - (len(decoded) - 1)


@given(st.text(max_size=9000))
def test_parse_never_fails(payload: str) -> None:
    request = protocol.parse(payload, 1)
    fields = [field for field in payload.split(" ") if field]
    # nothing lost, nothing invented: the fields are the payload's, in order
    assert [request.command, request.channel, *request.args][: len(fields)] == fields
    assert request.command == (fields[0] if fields else "")
    assert request.answers == (len(fields) > 1 and fields[1] != protocol.NO_ANSWER)
