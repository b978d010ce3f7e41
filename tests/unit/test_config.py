"""Configuration loading: typed values, and every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from collector import config
from collector.errors import ConfigError
from tests.helpers import ROOT

GOOD = """
[repository]
dsn = postgresql://powa@127.0.0.1:5432/powa

[redis]
url = redis://127.0.0.1:6379/0
prefix = powa

[supervisor]
http = 127.0.0.1:9001
username = admin
password = change-me

[collector]
use_server_alias = false
auto_enable = true

[plugins]
enabled =
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.cfg"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    return caught.value.problems


def test_the_shipped_file_loads() -> None:
    cfg = config.load(ROOT / "collector.cfg")
    assert cfg.repository.dsn.startswith("postgresql://")
    assert cfg.redis.prefix == "powa"
    assert cfg.supervisor.http == "127.0.0.1:9001"
    assert cfg.collector.auto_enable is True
    assert cfg.collector.use_server_alias is False
    assert cfg.plugins.enabled == ()


def test_typed_values_and_paths(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD.replace("auto_enable = true", "auto_enable = no")))
    assert cfg.collector.auto_enable is False
    assert cfg.directory == tmp_path
    assert cfg.workers_available == tmp_path / "workers_available"
    assert cfg.workers_enabled == tmp_path / "workers_enabled"
    assert cfg.supervisor_socket == tmp_path / "supervisor.sock"
    assert cfg.redis.status_ttl == 30


def test_every_problem_is_reported_with_file_section_and_key(tmp_path: Path) -> None:
    text = GOOD.replace("auto_enable = true", "auto_enable = maybe\nfrobnicate = 1").replace(
        "prefix = powa", "prefix = has space"
    ) + "\n[surprise]\nx = 1\n"
    found = problems(tmp_path, text)
    path = str(tmp_path / "collector.cfg")
    assert all(line.startswith(path + ": [") for line in found)
    assert any("[collector] auto_enable: expected true or false" in p for p in found)
    assert any("[collector] frobnicate: unknown key" in p for p in found)
    assert any("[redis] prefix:" in p for p in found)
    assert any("[surprise]: unknown section" in p for p in found)
    assert len(found) == 4


@pytest.mark.parametrize("text, expected", [
    ("[redis]\nurl = redis://127.0.0.1\n", "[repository]: missing section"),
    (GOOD.replace("dsn = postgresql://powa@127.0.0.1:5432/powa", "dsn ="), "[repository] dsn"),
    (GOOD.replace("dsn = postgresql://powa@127.0.0.1:5432/powa", "dsn = host=x bogus=1"),
     "[repository] dsn: not a valid"),
    (GOOD.replace("redis://127.0.0.1:6379/0", "http://x"), "[redis] url"),
    (GOOD.replace("redis://127.0.0.1:6379/0", "redis://:pw@[::1/0"), "[redis] url: not a valid"),
    (GOOD.replace("redis://127.0.0.1:6379/0", "redis://h:99999/0"), "[redis] url: not a valid"),
    (GOOD.replace("redis://127.0.0.1:6379/0", "redis://10.1.2.3:6379/0"),
     "[redis] url: 10.1.2.3 is not a loopback address: give Redis a password"),
    (GOOD.replace("http = 127.0.0.1:9001", "http = 0.0.0.0:9001").replace(
        "password = change-me", "password ="), "[supervisor] http: 0.0.0.0:9001 is not a loopback"),
    (GOOD.replace("http = 127.0.0.1:9001", "http = :9001").replace(
        "password = change-me", "password ="), "[supervisor] http"),
    (GOOD.replace("http = 127.0.0.1:9001", "http = localhost:notaport"), "[supervisor] http"),
    (GOOD + "\n[collector]\nlog_level = loud\n", "cannot parse"),
    (GOOD.replace("use_server_alias = false", "log_level = loud"), "[collector] log_level"),
    (GOOD.replace("enabled =", "enabled = ok, bad-name"), "[plugins] enabled"),
    ("not an ini file", "cannot parse"),
])
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert expected in found[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "nope.cfg")
    assert caught.value.problems == [
        f"{tmp_path / 'nope.cfg'}: cannot read configuration file: No such file or directory"
    ]


def test_secrets_never_echoed(tmp_path: Path) -> None:
    text = GOOD.replace("postgresql://powa@", "postgresql://powa:hunter2-secret@").replace(
        "dsn = postgresql", "dsn = postgresql").replace("/powa\n", "/powa?bogus=1\n", 1)
    found = problems(tmp_path, text)
    assert found and all("hunter2-secret" not in p for p in found)
    cfg = config.load(write(tmp_path, GOOD.replace("postgresql://powa@",
                                                   "postgresql://powa:hunter2-secret@")))
    assert "hunter2-secret" in cfg.secrets()
    assert "hunter2-secret" not in repr(cfg)
    assert "change-me" not in repr(cfg)


def test_loopback_detection() -> None:
    assert config.is_loopback("127.0.0.1")
    assert config.is_loopback("127.9.8.7")
    assert config.is_loopback("::1")
    assert config.is_loopback("localhost")
    assert not config.is_loopback("")
    assert not config.is_loopback("0.0.0.0")
    assert not config.is_loopback("10.0.0.1")
    assert not config.is_loopback("example.com")


@pytest.mark.parametrize("program", [
    ["-m", "collector.worker", "--srvid", "1"],
    ["-m", "collector.control"],
    ["create_supervisord_config.py"],
])
def test_programs_exit_2_with_one_line_per_problem(tmp_path: Path, program: list[str]) -> None:
    bad = write(tmp_path, GOOD.replace("auto_enable = true", "auto_enable = maybe").replace(
        "prefix = powa", "prefix = a b"))
    result = subprocess.run([sys.executable, *program, "-c", str(bad)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert all(str(bad) in line for line in lines)
    assert result.stdout == ""


@pytest.mark.parametrize("url", [
    "redis://:secret@10.1.2.3:6379/0", "rediss://10.1.2.3:6380/0?ssl_certfile=/etc/c.pem",
    "redis://localhost:6379/0", "redis://[::1]:6379/0", "unix:///run/redis/redis.sock",
])
def test_redis_off_loopback_needs_a_password_or_a_client_certificate(
    tmp_path: Path, url: str
) -> None:
    path = tmp_path / "collector.cfg"
    path.write_text(GOOD.replace("redis://127.0.0.1:6379/0", url))
    assert config.load(path).redis.url == url
