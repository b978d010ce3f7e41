"""powa-web's own code against a running fleet: it sees the collector and gets its answers.

powa-web 4.1.4 (PoWA 4.1) runs as its own server and is used like a browser
would; powa-web 5.3.1 (PoWA 5) refuses to log in to a PoWA 5.0 repository
("powa-archivist version 5.0.X does not match powa-web version 5.3.X"), so its
request handlers are driven directly (tests/powaweb.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import simplejson as json

from collector import __version__
from tests import powaweb
from tests.conftest import Supervisord, wait_all_running
from tests.helpers import Fleet, Repo, wait_for
from tests.powa5 import SHOP

COLLECTOR = f"Remote collector (powa-fleet {__version__})"


def installed(release: powaweb.Release) -> Path:
    """The release's cached virtualenv (built on first use); a skip when PyPI is out of reach."""
    try:
        return powaweb.install(release)
    except powaweb.Unavailable as error:
        pytest.skip(f"powa-web {release.version} cannot be installed from PyPI: {error}")


@pytest.fixture(scope="session")
def powa_web_4() -> Path:
    return installed(powaweb.POWA_WEB_4)


@pytest.fixture(scope="session")
def powa_web_5() -> Path:
    return installed(powaweb.POWA_WEB_5)


def one_answer(answers: list[dict[str, str]]) -> tuple[str, str]:
    """(STATUS, DATA) of the single answer powa-web received."""
    assert len(answers) == 1, answers
    [(status, data)] = answers[0].items()
    return status, data


def collector_seen(page: str) -> bool:
    """powa-web 4's collectors widget shows our control as a running collector."""
    return re.search(
        re.escape(f"<b>{COLLECTOR}:</b>") + r'\s*<i class="fi-check ok">', page) is not None


# ---------------------------------------------------------------- PoWA 4.1, powa-web 4.1.4
@pytest.fixture
def running(fleet: Fleet, repo: Repo, supervisord: Supervisord) -> Supervisord:
    wait_all_running(supervisord, repo)
    return supervisord


def test_powa_web_4_pages_show_the_collector_and_each_server_status(
    powa_web_4: Path, repo: Repo, running: Supervisord, tmp_path: Path
) -> None:
    config = powaweb.write_config(tmp_path, repo.dsn)
    with powaweb.serving(powa_web_4, config) as web:
        assert web.login() == "/server/", web.output()
        widget = web.get("/config/allcollectors/")
        assert powaweb.COLLECTOR_DOWN not in widget
        assert collector_seen(widget), widget
        assert "<b>Connected as:</b> postgres" in widget
        # the servers grid: statuses from one WORKERS_STATUS
        servers = web.json("/config/powa_servers/")["data"]
        assert {row["id"]: row["collector_status"] for row in servers if row["id"]} == {
            srvid: "running" for srvid in repo.srvids}
        # a server's configuration page: WORKERS_STATUS for that server
        assert web.json("/config/2/server_details/")["messages"] == {
            "success": ["Collector status for this instance: running"]}
        # the "Reload collector" button shows success only on an OK answer
        assert web.json("/reload_collector/") is True

        running.ctl("stop", "worker_3")
        assert web.json("/config/3/server_details/")["messages"] == {
            "alert": ["Collector status for this instance: stopped"]}
        servers = web.json("/config/powa_servers/")["data"]
        assert [row["collector_status"] for row in servers if row["id"] == 3] == ["stopped"]

        # without the control, powa-web says so: the check above is not a given
        running.ctl("stop", "control")
        def widget_when_down() -> str | None:
            page = web.get("/config/allcollectors/")
            return page if powaweb.COLLECTOR_DOWN in page else None

        down = wait_for(widget_when_down, 15, "powa-web seeing no collector")
        assert not collector_seen(down)


def test_powa_web_4_notify_collector_gets_our_answers(
    powa_web_4: Path, repo: Repo, running: Supervisord, tmp_path: Path
) -> None:
    config = powaweb.write_config(tmp_path, repo.dsn)
    assert collector_seen(powaweb.collectors_widget(powa_web_4, config))
    # with the timeouts powa-web's pages use
    status, data = one_answer(powaweb.notify(powa_web_4, config, "WORKERS_STATUS", timeout=1))
    assert (status, json.loads(data)) == ("OK", {"1": "running", "2": "running", "3": "running"})
    status, data = one_answer(powaweb.notify(powa_web_4, config, "WORKERS_STATUS", "2",
                                             timeout=2))
    assert (status, json.loads(data)) == ("OK", {"2": "running"})
    assert one_answer(powaweb.notify(powa_web_4, config, "RELOAD")) == ("OK", "OK")
    status, data = one_answer(powaweb.notify(powa_web_4, config, "REFRESH_DB_CAT", "1", "0"))
    assert status == "ERROR"
    assert "PoWA 5" in data


# ---------------------------------------------------------------- PoWA 5, powa-web 5.3.1
def test_powa_web_5_sees_the_collector_and_gets_our_answers(
    powa_web_5: Path, powa5_repo: Repo, running5: Supervisord, tmp_path: Path
) -> None:
    config = powaweb.write_config(tmp_path, powa5_repo.dsn)
    widget = json.loads(powaweb.collectors_widget(powa_web_5, config))
    [collector] = [row for row in widget if row["id"] == "collector"]
    assert collector["powa_kind"] == COLLECTOR
    assert collector["start"] is not None and collector["usename"] == "postgres"

    status, data = one_answer(powaweb.notify(powa_web_5, config, "WORKERS_STATUS", timeout=1))
    assert (status, json.loads(data)) == ("OK", {"1": "running", "2": "running"})
    status, data = one_answer(powaweb.notify(powa_web_5, config, "WORKERS_STATUS", "1",
                                             timeout=2))
    assert (status, json.loads(data)) == ("OK", {"1": "running"})
    # as its "Refresh catalogs" button sends it: srvid, count, names (0: every database)
    refreshed = ("OK", "Catalogs will be refreshed during the next snapshot")
    assert one_answer(powaweb.notify(powa_web_5, config, "REFRESH_DB_CAT", "1", "1",
                                     SHOP)) == refreshed
    assert one_answer(powaweb.notify(powa_web_5, config, "REFRESH_DB_CAT", "2", "0")) == refreshed
    assert one_answer(powaweb.notify(powa_web_5, config, "RELOAD")) == ("OK", "OK")
    status, data = one_answer(powaweb.notify(powa_web_5, config, "FORCE_SNAPSHOT", "1"))
    assert (status, data) in {("OK", "Snapshot will begin shortly"),
                              ("OK", "Snapshot in progress")}
