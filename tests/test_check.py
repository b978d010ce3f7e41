"""``powa-fleet check``: every problem of a fleet named on its own line, before anything starts;
``migrate`` from upstream's powa-collector.conf; the shipped systemd unit."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import simplejson as json

from collector.demo import sandbox
from tests.conftest import Supervisord
from tests.helpers import PYTHON, ROOT, Fleet, Repo

#: upstream powa-collector's powa-collector.conf-dist, with the keys its options.py knows
UPSTREAM_SAMPLE = """{
    "repository": {
        "dsn": "postgresql://powa_user@localhost:5432/powa"
    },
    "use_server_alias": true,
    "debug": false
}
"""


def powa_fleet(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "collector", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False)


def lines_with(output: str, *words: str) -> list[str]:
    return [line for line in output.splitlines() if all(w in line for w in words)]


def test_a_sound_fleet_passes_even_while_it_runs(
    fleet: Fleet, repo: Repo, supervisord: Supervisord
) -> None:
    supervisord.wait_running("control")
    result = powa_fleet("check", "-c", str(fleet.cfg_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not lines_with(result.stdout, "FAIL")
    assert lines_with(result.stdout, "ok", "web UI", "served by this fleet's supervisord")
    assert lines_with(result.stdout, "ok", "other collector", "no other collector")
    for srvid in repo.srvids:
        assert lines_with(result.stdout, "ok", f"server {srvid} ('remote {srvid}'", "reachable")
    # the test writes collector.cfg 0644 with a web UI password in it
    assert lines_with(result.stdout, "warning", "config", "chmod 600")
    assert "web-secret" not in result.stdout

    as_json = powa_fleet("--json", "check", "-c", str(fleet.cfg_path))
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["ok"] is True
    assert {"verdict", "item", "message", "hint"} <= set(document["checks"][0])
    assert {c["verdict"] for c in document["checks"]} <= {"ok", "warning"}


def test_every_problem_is_named_on_its_own_line(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    down = cluster_factory(workload=0)
    down_id = repo.register(down, alias="gone")
    down.stop()
    old = cluster_factory(workload=0)
    with old.connect() as conn:
        conn.execute("UPDATE pg_extension SET extversion = '3.2.0' WHERE extname = 'powa'")
    old_id = repo.register(old, alias="old powa")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet.write_config(
            redis={"url": f"redis://127.0.0.1:{sandbox.free_port()}/0"},
            supervisor={"http": f"127.0.0.1:{port}"},
        )
        with psycopg.connect(repo.dsn, application_name="PoWA collector - main thread (1.3.2)"), \
                psycopg.connect(repo.dsn, application_name="PoWA collector - main thread "
                                "(powa-fleet 0.0.9)"):
            result = powa_fleet("-c", str(fleet.cfg_path), "check")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert len(lines_with(out, "FAIL", "redis", "cannot reach Redis")) == 1
    assert len(lines_with(out, "FAIL", "web UI", f"127.0.0.1:{port} is in use")) == 1
    assert len(lines_with(out, "FAIL", f"server {down_id} ('gone'", "unreachable")) == 1
    assert len(lines_with(out, "FAIL", f"server {old_id} ('old powa'", "PoWA 3.2.0 on the "
                          "remote")) == 1
    assert len(lines_with(out, "FAIL", "other collector", "main thread (1.3.2)")) == 1
    assert len(lines_with(out, "FAIL", "other collector", "another powa-fleet control")) == 1
    assert len(lines_with(out, "FAIL")) == 6
    for srvid in repo.srvids:
        assert lines_with(out, "ok", f"server {srvid} (")
    assert all(" -> " in line for line in lines_with(out, "FAIL"))


def test_missing_extensions_of_a_remote(
    fleet: Fleet, repo: Repo, cluster_factory: Callable[..., sandbox.Cluster]
) -> None:
    bare = cluster_factory(workload=0)
    with bare.connect() as conn:
        conn.execute("DROP EXTENSION pg_qualstats")
    srvid = repo.register(bare, alias="bare")
    result = powa_fleet("check", "--json", "-c", str(fleet.cfg_path))
    assert result.returncode == 1
    failed = [c for c in json.loads(result.stdout)["checks"] if c["verdict"] == "FAIL"]
    assert [c["item"] for c in failed] == [f"server {srvid} ('bare', 127.0.0.1:{bare.port})"]
    assert "missing: pg_qualstats" in failed[0]["message"]


def test_a_bad_config_lists_every_problem(fleet: Fleet) -> None:
    fleet.write_config(collector={"auto_enable": "maybe", "surprise": "1"})
    result = powa_fleet("check", "-c", str(fleet.cfg_path))
    assert result.returncode == 2
    assert len(lines_with(result.stdout, "FAIL", "config", "auto_enable")) == 1
    assert len(lines_with(result.stdout, "FAIL", "config", "surprise: unknown key")) == 1


def test_migrate_upstream_sample_then_check(
    tmp_path: Path, repo: Repo, redis_server: sandbox.RedisServer
) -> None:
    upstream = tmp_path / "powa-collector.conf"
    repo_uri = f"postgresql://postgres@127.0.0.1:{repo.cluster.port}/powa"
    upstream.write_text(UPSTREAM_SAMPLE.replace("postgresql://powa_user@localhost:5432/powa",
                                                repo_uri))
    target = tmp_path / "etc" / "collector.cfg"
    migrate = ["migrate", str(upstream), "-c", str(target), "--redis-url", redis_server.url,
               "--http", f"127.0.0.1:{sandbox.free_port()}"]
    result = powa_fleet(*migrate)
    assert result.returncode == 0, result.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    text = target.read_text()
    assert f"dsn = {repo_uri}" in text
    assert "use_server_alias = true" in text
    again = powa_fleet(*migrate)
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert target.read_text() == text
    assert powa_fleet(*migrate, "--force").returncode == 0

    checked = powa_fleet("check", "-c", str(target))
    assert checked.returncode == 0, checked.stdout
    assert not lines_with(checked.stdout, "warning", "config")


def test_migrate_refuses_what_upstream_refuses(tmp_path: Path) -> None:
    upstream = tmp_path / "powa-collector.conf"
    upstream.write_text('{"repository": {}, "debug": true}')
    result = powa_fleet("migrate", str(upstream), "-c", str(tmp_path / "collector.cfg"))
    assert result.returncode == 2
    assert "repository.dsn" in result.stderr
    assert not (tmp_path / "collector.cfg").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """The shipped unit, with /opt/powa-fleet pointing at this virtualenv (verify wants
    the programs of ExecStart to exist)."""
    unit = (ROOT / "packaging" / "powa-fleet.service").read_text()
    venv = Path(PYTHON).parent.parent
    local = tmp_path / "powa-fleet.service"
    local.write_text(unit.replace("/opt/powa-fleet", str(venv)))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "powa-fleet.service" not in result.stderr, result.stderr
