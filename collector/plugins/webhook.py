"""Webhook plugin: POST a worker's state transitions to an HTTP endpoint, as JSON.

    [plugin:webhook]
    url = https://alerts.example.com/powa
    timeout = 5
    retries = 3
    failure_threshold = 3
    headers =
        Authorization: Bearer 0123456789abcdef
        X-Team: dba

Not every snapshot is sent, only transitions: every ``status_changed``; the
``snapshot_failed`` that brings ``consecutive_failures`` to
``failure_threshold`` (once); the first ``snapshot_done`` after that.  The
event is posted with a ``notification`` field: ``status_changed``,
``failures_threshold`` or ``recovered``.

Header values and the URL's credentials are secrets: they are masked in every
log line and never echoed in configuration errors.  A failed POST (network
error, any status but 2xx, redirects included: following one could hand the
headers to another host) is tried again ``retries`` times with exponential
backoff and jitter, then logged and dropped.
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from email.message import Message
from typing import IO
from urllib.parse import unquote, urlsplit, urlunsplit

import simplejson as json

from collector import logs
from collector.backoff import Backoff
from collector.plugins import Event, Plugin, integer, number

log = logging.getLogger(__name__)

#: an HTTP header name (RFC 9110 token)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: visible characters, spaces and tabs: anything else could split or smuggle a header
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
BACKOFF_INITIAL = 1.0
BACKOFF_MAXIMUM = 30.0


class Webhook(Plugin):
    """Notifies an HTTP endpoint of one server's transitions (see the module's docstring)."""

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        super().__init__(name, settings)
        url = self.setting("url", "", _http_url, required=True)
        self.http_timeout = self.setting("timeout", 5.0, number(0.1, 300))
        self.retries = self.setting("retries", 3, integer(0, 10))
        self.threshold = self.setting("failure_threshold", 3, integer(1, 1_000_000))
        headers: dict[str, str] = self.setting("headers", {}, parse_headers)
        self.url, self.headers = _with_credentials(url, headers)
        password = urlsplit(url).password
        logs.REDACTOR.add(url, self.url, password, unquote(password or ""), *self.headers.values())
        # shown in logs instead of the URL, whose path or query may hold a token
        self.where = _origin(self.url)
        self.timeout = self._worst_case()
        self._alerted = False
        self._opener = urllib.request.build_opener(_NoRedirect)
        #: seams for tests: what delivers a notification, and how to wait between attempts
        self.send: Callable[[Event], object] = self.deliver
        self.sleep: Callable[[float], None] = time.sleep

    def _worst_case(self) -> float:
        """Seconds all attempts of one notification may take, before it is reported hung."""
        backoff = sum(
            min(BACKOFF_INITIAL * 2.0**n, BACKOFF_MAXIMUM) for n in range(self.retries)
        )
        return (self.retries + 1) * self.http_timeout + backoff * 1.2 + 5

    def status_changed(self, event: Event) -> None:
        self._notify("status_changed", event)

    def snapshot_failed(self, event: Event) -> None:
        # ">=" rather than "==": the event crossing the threshold may have been dropped
        if not self._alerted and int(event.get("consecutive_failures") or 0) >= self.threshold:
            self._alerted = True
            self._notify("failures_threshold", event)

    def snapshot_done(self, event: Event) -> None:
        if self._alerted:
            self._alerted = False
            self._notify("recovered", event)

    def _notify(self, notification: str, event: Event) -> None:
        self.send({**event, "notification": notification})

    def deliver(self, payload: Event) -> bool:
        """POST one notification, with retries; False when it was dropped."""
        body = json.dumps(payload).encode()
        backoff = Backoff(initial=BACKOFF_INITIAL, maximum=BACKOFF_MAXIMUM, jitter=0.2)
        attempts = self.retries + 1
        error = ""
        for attempt in range(1, attempts + 1):
            try:
                self._post(body)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = logs.one_line(exc, limit=200)
            else:
                log.debug("webhook %s: %s notification sent", self.where, payload["notification"])
                return True
            if attempt < attempts:
                delay = backoff.next_delay()
                log.warning("webhook %s: attempt %d of %d failed (%s), next in %.1fs",
                            self.where, attempt, attempts, error, delay)
                self.sleep(delay)
        log.error("webhook %s: %s notification of server %s dropped after %d attempt(s): %s",
                  self.where, payload["notification"], payload.get("srvid"), attempts, error)
        return False

    def _post(self, body: bytes) -> None:
        headers = {**self.headers, "Content-Type": "application/json"}
        # S310: the scheme was checked at start, http or https only
        request = urllib.request.Request(  # noqa: S310
            self.url, data=body, headers=headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.http_timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise
        if not 200 <= status < 300:
            raise http.client.HTTPException(f"HTTP status {status}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(  # noqa: PLR0917 - the signature urllib calls
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: Message, newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _http_url(raw: str) -> str:
    # the URL is never echoed: it may hold a password or a token
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if any(c.isspace() for c in raw):
        raise ValueError("must not contain spaces")
    return raw


def parse_headers(raw: str) -> dict[str, str]:
    """``Name: value``, one a line (indent the lines after the first in collector.cfg)."""
    headers: dict[str, str] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, value = line.strip().partition(":")
        # values are secrets (tokens): messages name the line, never its content
        if not sep or not _HEADER_NAME.fullmatch(name.strip()):
            raise ValueError(f"line {lineno}: expected 'Name: value'")
        if not _HEADER_VALUE.fullmatch(value):
            raise ValueError(f"line {lineno}: control or non-Latin-1 characters in the value")
        headers[name.strip()] = value.strip()
    return headers


def _with_credentials(url: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Credentials in the URL become a Basic Authorization header (urllib ignores them)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, headers
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit(parts._replace(netloc=host))
    if any(name.lower() == "authorization" for name in headers):
        return bare, headers
    # URLs carry them percent-encoded (p%40ss for p@ss); the header wants them as they are
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
    return bare, {**headers, "Authorization": "Basic " + base64.b64encode(pair).decode()}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
