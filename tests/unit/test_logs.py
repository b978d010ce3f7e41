"""Secrets are masked in every line that leaves a process."""

from __future__ import annotations

import logging

import pytest
import simplejson as json

from collector import keys, logs


def test_known_secrets_and_password_shapes_are_masked() -> None:
    redactor = logs.Redactor()
    redactor.add("pa55word", None, "")
    assert redactor.redact("auth pa55word failed") == f"auth {logs.MASK} failed"
    assert logs.MASK in redactor.redact("host=x password='it''s' user=y")
    assert "it''s" not in redactor.redact("host=x password='it''s' user=y")
    assert redactor.redact("redis://:topsecret@h:6379/0") == f"redis://:{logs.MASK}@h:6379/0"
    assert "s3" not in redactor.redact("postgresql://u:s3@h/db")


def test_one_line_flattens_and_bounds() -> None:
    logs.REDACTOR.add("xyzzy-secret")
    text = logs.one_line("line one\nline two xyzzy-secret\n" + "x" * 1000, limit=100)
    assert "\n" not in text
    assert "xyzzy-secret" not in text
    assert len(text) == 100


def test_formatter_masks_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("test", "info")
    logs.REDACTOR.add("trace-secret")
    try:
        raise RuntimeError("connection with trace-secret failed")
    except RuntimeError:
        logging.getLogger("t").exception("boom %s", "trace-secret")
    err = capsys.readouterr().err
    assert "trace-secret" not in err
    # the message, the exception and the source line of the traceback
    assert err.count(logs.MASK) == 3


def test_short_secrets_are_masked_where_they_stand_alone() -> None:
    redactor = logs.Redactor()
    redactor.add("1234", "2")
    assert redactor.redact("password was 1234.") == f"password was {logs.MASK}."
    assert redactor.redact("auth 2 failed") == f"auth {logs.MASK} failed"
    # not inside other words and numbers: the log line stays readable
    assert redactor.redact("pid 41234 at 2026-11-24") == "pid 41234 at 2026-11-24"


def test_status_documents_stay_valid_json_whatever_the_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redactor = logs.Redactor()
    redactor.add("1234", "doc-secret-value", "server")
    monkeypatch.setattr(keys, "REDACTOR", redactor)
    document = {"pid": 41234, "alias": "db password=x, more", "last_error": "doc-secret-value",
                "status": "no connection to remote server", "started_at": "2026-11-24T12:34"}
    parsed = json.loads(keys.dumps(document))
    assert parsed["pid"] == 41234
    assert parsed["last_error"] == logs.MASK
    assert parsed["alias"] == f"db password={logs.MASK} more"
    # this program's own words and times are kept whole
    assert parsed["status"] == "no connection to remote server"
    assert parsed["started_at"] == "2026-11-24T12:34"
