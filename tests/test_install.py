"""``pip install`` of the project into a fresh virtualenv, used from elsewhere as a DBA would.

The sources are copied first (a build in the checkout would leave ``build/``
behind while other tests run); the virtualenv gets no pip of its own (the
checkout's pip installs into it with ``--python``), which saves the time of
``ensurepip``.  Dependencies come from the index pip is configured with, and
its cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import simplejson as json

import collector
from tests.conftest import Supervisord
from tests.helpers import PYTHON, ROOT, Fleet, Repo, wait_for

#: what a source distribution would not hold either: anywhere, and at the top only
NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis")
NOT_SHIPPED_TOP = {".venv", ".git", "build", "demo", "workers_available", "workers_enabled",
                   "logs", "supervisord.conf", "supervisord.pid", "supervisor.sock", ".fleet.lock",
                   ".spawner.sock"}


def not_shipped(directory: str, names: list[str]) -> set[str]:
    top = NOT_SHIPPED_TOP if Path(directory) == ROOT else set()
    return set(NOT_SHIPPED(directory, names)) | (top & set(names))


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=not_shipped)
    target = base / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(target)], check=True)
    subprocess.run(
        [PYTHON, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "-q",
         "--disable-pip-version-check", str(source)],
        check=True, timeout=300,
    )
    shutil.rmtree(source)
    yield target


def run(venv: Path, *args: str, cwd: Path,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, with nothing of the checkout in sight."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "POWA_FLEET_CONFIG")}
    return subprocess.run([str(venv / "bin" / "powa-fleet"), *args], capture_output=True,
                          text=True, cwd=cwd, env={**clean, **(env or {})}, timeout=120,
                          check=False)


def test_the_installed_command_runs_a_fleet(venv: Path, tmp_path: Path, fleet: Fleet,
                                            repo: Repo) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = str(fleet.cfg_path)
    version = run(venv, "--version", cwd=elsewhere)
    assert version.returncode == 0
    assert version.stdout.strip() == f"powa-fleet {collector.__version__}"
    installed = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import collector; print(collector.__file__)"],
                               capture_output=True, text=True, cwd=elsewhere, check=True)
    assert str(venv) in installed.stdout

    checked = run(venv, "check", "-c", cfg, cwd=elsewhere)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    generated = run(venv, "--config", cfg, "generate", cwd=elsewhere)
    assert generated.returncode == 0, generated.stderr
    assert "worker_1: new, enabled" in generated.stdout
    program = (fleet.directory / "workers_available" / "worker_1.conf").read_text()
    # the fleet runs the installed package, with the virtualenv's python
    assert f"command = {venv}/bin/python -OO -m collector.worker -c {cfg}" in program

    # ./collector.cfg of the working directory, then options after the command
    quiet = run(venv, "status", cwd=fleet.directory)
    assert quiet.returncode == 5
    assert quiet.stdout.count("unknown: supervisord unavailable") == 3
    supervisord = _start(venv, fleet)
    try:
        wait_for(lambda: run(venv, "status", "-c", cfg, cwd=elsewhere).returncode == 0, 30,
                 "every installed worker running")
        table = run(venv, "status", "--json", cwd=elsewhere, env={"POWA_FLEET_CONFIG": cfg})
        assert [r["status"] for r in json.loads(table.stdout)] == ["running"] * 3
        wait_for(lambda: "RUNNING" in run(venv, "-c", cfg, "ctl", "status", "control",
                                           cwd=elsewhere).stdout, 30, "control RUNNING")
    finally:
        supervisord.stop()


def test_without_a_configuration_it_says_where_it_looked(venv: Path, tmp_path: Path) -> None:
    result = run(venv, "status", cwd=tmp_path)
    if Path("/etc/powa-fleet/collector.cfg").exists():
        pytest.skip("this machine has /etc/powa-fleet/collector.cfg")
    assert result.returncode == 2
    assert f"{tmp_path}/collector.cfg" in result.stderr
    assert "/etc/powa-fleet/collector.cfg" in result.stderr


def _start(venv: Path, fleet: Fleet) -> Supervisord:
    """The installed supervisord on the generated fleet."""
    log = (fleet.directory / "supervisord.out").open("ab")
    process = subprocess.Popen(
        [str(venv / "bin" / "supervisord"), "-n", "-c", str(fleet.directory / "supervisord.conf")],
        stdout=log, stderr=subprocess.STDOUT, cwd=fleet.directory,
    )
    log.close()
    running = Supervisord(fleet, process)
    wait_for(lambda: (fleet.directory / "supervisor.sock").exists() or process.poll() is not None,
             30, "supervisord socket")
    assert process.poll() is None, (fleet.directory / "supervisord.out").read_text()
    return running

