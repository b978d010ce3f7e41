"""Logging set-up and secret redaction.

Every program logs to stderr (supervisord captures it into per-program log
files with rotation).  The formatter passes each finished line, traceback
included, through a ``Redactor`` that knows the secrets of the process:
server passwords read from ``powa_servers`` and the passwords of the
configuration's DSN and URLs.  Untrusted text (aliases, hostnames) is logged
with ``%r`` by the callers so that it cannot forge log lines.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time

MASK = "********"

# password=... in a libpq keyword/value string, quoted or not
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# scheme://user:password@host
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE)


class Redactor:
    """Replaces known secrets, and anything shaped like a password, with a mask.

    A secret shorter than ``SHORT`` characters (a weak password, a webhook
    header such as ``X-Api-Version: 2``) is masked only where it stands alone:
    masked inside every longer word or number, it would turn log lines into
    noise (each ``2`` of a timestamp) while hiding nothing a guess would not find.
    """

    SHORT = 6

    def __init__(self) -> None:
        self._secrets: frozenset[str] = frozenset()
        self._short: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            self._secrets = self._secrets | {s for s in secrets if s}
            short = sorted((s for s in self._secrets if len(s) < self.SHORT), key=len,
                           reverse=True)
            self._short = re.compile(
                "(?<![0-9A-Za-z])(?:" + "|".join(map(re.escape, short)) + ")(?![0-9A-Za-z])"
            ) if short else None

    def redact(self, text: str) -> str:
        # longest first, so that a secret containing another is masked whole
        for secret in sorted(self._secrets, key=len, reverse=True):
            if len(secret) >= self.SHORT and secret in text:
                text = text.replace(secret, MASK)
        if self._short is not None:
            text = self._short.sub(MASK, text)
        text = _CONNINFO_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
        return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)


#: the process-wide redactor; every log line and every status text goes through it
REDACTOR = Redactor()


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return REDACTOR.redact(super().format(record))


def setup(program: str, level: str = "info") -> None:
    """Send this process's logs to stderr, one redacted line per record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter(
            f"%(asctime)s {program}[%(process)d] %(levelname)s %(name)s: %(message)s"
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # redis-py and psycopg are chatty at DEBUG about things we already report
    for noisy in ("psycopg", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))


def one_line(text: object, limit: int = 500) -> str:
    """A redacted, single-line rendering of an error, for status and answers."""
    flat = " ".join(str(text).split())
    flat = REDACTOR.redact(flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Outage:
    """Logs a dependency's failure once per outage, and its return once.

    A Redis or repository that stays away for an hour must not write a line
    per attempt (hundreds of workers retry every few seconds).
    """

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failed(self, exc: object) -> bool:
        """Note a failure; True (and one warning) when it starts an outage."""
        if self.since is not None:
            return False
        self.since = time.monotonic()
        self.log.warning("%s (will keep trying): %s", self.what, one_line(exc))
        return True

    def recovered(self, again: str) -> bool:
        """Note a success; True (and one line saying ``again``) when it ends an outage."""
        if self.since is None:
            return False
        self.log.info("%s after %.0fs", again, time.monotonic() - self.since)
        self.since = None
        return True
