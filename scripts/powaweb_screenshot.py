#!/usr/bin/env python3
"""powa-web 4.1.4 in a real browser, against a running fleet: screenshots of what it shows.

    .venv/bin/python scripts/powaweb_screenshot.py -c demo/collector.cfg [--out docs/screenshots]

Takes the repository of a running fleet (the demo's ``collector.cfg``, or
``--dsn``), runs powa-web from PyPI on a free loopback port (its virtualenv is
the test suite's, cached under /var/cache/powa-fleet), logs in with headless
Chromium (Debian's ``chromium``), opens the configuration page (collector
processes and every server's collector status) and one server's configuration
page, and saves PNG screenshots.  It prints what the pages say: whether
powa-web sees a running collector, and each server's status.

Chromium is driven through the DevTools protocol on a pipe
(``--remote-debugging-pipe``): no webdriver, no extra Python package.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import powaweb  # noqa: E402

WIDTH, HEIGHT = 1280, 800
#: a message of the DevTools protocol on the pipe ends with a NUL byte
END = b"\0"


def _high(fds: tuple[int, int]) -> tuple[int, int]:
    """The pipe moved to fds 10 and up, clear of the 3 and 4 the browser is given."""
    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return moved[0], moved[1]


class Browser:
    """Headless Chromium and one page of it, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, self._commands = _high(os.pipe())
        self._replies, from_browser = _high(os.pipe())
        # the browser reads commands on fd 3 and writes replies on fd 4: bash puts the
        # pipes there (its redirections take any fd number, unlike POSIX sh's)
        plumbing = (f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
                    f' {to_browser}<&- {from_browser}>&-')
        self.process = subprocess.Popen(
            ["bash", "-c", plumbing, binary, "--headless", "--no-sandbox", "--disable-gpu",
             "--hide-scrollbars", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_browser, from_browser),
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._last_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target,
                                  flatten=True)["sessionId"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One command (on the page once attached); its result."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if getattr(self, "_session", None):
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + END
        while data:
            data = data[os.write(self._commands, data):]
        while True:
            reply = self._read(timeout=60)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))

    def _read(self, timeout: float) -> dict[str, Any]:
        while END not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            chunk = os.read(self._replies, 1 << 16) if ready else b""
            if not chunk:
                raise RuntimeError("no word from chromium (it exited or hangs)")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(END)
        return dict(json.loads(raw))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_until(self, expression: str, timeout: float) -> bool:
        """Poll a JavaScript condition on the page (it may be loading meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                if self.evaluate(expression):
                    return True
            time.sleep(0.2)
        return False

    def screenshot(self, path: Path, whole: bool = True) -> None:
        """The page as PNG: all of it (up to 2000 px high), or what the window shows."""
        height = int(self.evaluate("document.documentElement.scrollHeight") or HEIGHT)
        if not whole:
            height = HEIGHT
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH,
                  height=min(max(height, HEIGHT), 2000), deviceScaleFactor=1, mobile=False)
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        self.call("Emulation.clearDeviceMetricsOverride")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.call("Browser.close")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        sys.exit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="powaweb-chromium-") as profile:
        opened = Browser(binary, Path(profile))
        try:
            yield opened
        finally:
            opened.close()


def repository_dsn(args: argparse.Namespace) -> str:
    if args.dsn:
        return str(args.dsn)
    parser = configparser.ConfigParser()
    if not parser.read(args.config):
        sys.exit(f"{args.config}: cannot read it")
    return parser.get("repository", "dsn")


def log_in(page: Browser, base: str) -> None:
    """The login form, filled and sent as a user does."""
    page.open(f"{base}/login/")
    if not page.wait_until("document.querySelector('input[name=username]') !== null", 30):
        sys.exit("powa-web's login page did not show up")
    page.evaluate("""
        document.querySelector('input[name=username]').value = 'postgres';
        document.querySelector('input[name=password]').value = '';
        document.querySelector('input[name=server]').value = 'main';
        document.querySelector('input[name=login]').click();
    """)
    if not page.wait_until("location.pathname !== '/login/' && document.readyState === 'complete'",
                           30):
        sys.exit("powa-web did not let us in: " + str(page.evaluate("document.body.innerText")))


def server_rows(page: Browser) -> list[str]:
    """The text of every row of the servers grid (the one with a "Collector Status" column)."""
    found = page.evaluate(
        "Array.from(document.querySelectorAll('table'))"
        ".filter(t => Array.from(t.querySelectorAll('th'))"
        "              .some(th => th.innerText.includes('Collector')))"
        ".flatMap(t => Array.from(t.querySelectorAll('tbody tr')))"
        ".map(tr => tr.innerText.replace(/\\s+/g, ' ').trim())")
    return [str(row) for row in found or []]


def configuration_page(page: Browser, base: str, out: Path, prefix: str) -> dict[str, Any]:
    """/config/: the collector processes widget and the servers grid."""
    page.open(f"{base}/config/")
    # the collectors widget and the servers grid are filled in by XHR after the load
    loaded = page.wait_until(
        "document.body.innerText.includes('Collector processes')"
        " && document.querySelectorAll('table tbody tr').length > 1"
        " && !document.body.innerText.includes('Loading')", 30)
    time.sleep(1)  # the grid's last repaint
    text = str(page.evaluate("document.body.innerText"))
    page.screenshot(out / f"{prefix}-configuration.png")
    return {"loaded": loaded, "collector down message": powaweb.COLLECTOR_DOWN in text,
            "collector line": next((line for line in text.splitlines()
                                    if "Remote collector" in line), None),
            "server rows": server_rows(page)}


def server_page(page: Browser, base: str, srvid: int, out: Path, prefix: str) -> dict[str, Any]:
    """/config/<srvid>/: the collector's status for that server (one WORKERS_STATUS)."""
    page.open(f"{base}/config/{srvid}/")
    loaded = page.wait_until(
        "/(Collector status|Could not get status) for this instance/"
        ".test(document.body.innerText)", 30)
    time.sleep(1)
    text = str(page.evaluate("document.body.innerText"))
    page.screenshot(out / f"{prefix}-server-{srvid}.png", whole=False)
    return {"loaded": loaded, "status line": next(
        (line for line in text.splitlines() if "for this instance" in line), None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", type=Path, help="the fleet's collector.cfg")
    source.add_argument("--dsn", help="the repository's DSN")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots",
                        help="where the PNG files go")
    parser.add_argument("--server", type=int, default=1, help="srvid of the server page")
    parser.add_argument("--prefix", default="powa-web-4",
                        help="file names: PREFIX-configuration.png, PREFIX-server-N.png")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        venv = powaweb.install(powaweb.POWA_WEB_4)
    except powaweb.Unavailable as error:
        sys.exit(f"powa-web {powaweb.POWA_WEB_4.version} cannot be installed: {error}")
    with tempfile.TemporaryDirectory(prefix="powaweb-") as work:
        config = powaweb.write_config(Path(work), repository_dsn(args))
        with powaweb.serving(venv, config) as web, browser() as page:
            log_in(page, web.base)
            seen = {"configuration": configuration_page(page, web.base, args.out, args.prefix),
                    "server": server_page(page, web.base, args.server, args.out, args.prefix)}
    print(json.dumps(seen, indent=2))
    for png in sorted(args.out.glob(f"{args.prefix}-*.png")):
        print(f"{png} ({png.stat().st_size // 1024} KB)")
    return 0 if not seen["configuration"]["collector down message"] else 1


if __name__ == "__main__":
    sys.exit(main())
