"""The worker's program section: the flags and environment that make a worker lighter."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from supervisor.datatypes import dict_of_key_value_pairs

from collector import config
from collector.fleet import bytecode, files


def load(tmp_path: Path) -> config.Config:
    path = tmp_path / "collector.cfg"
    path.write_text("[repository]\ndsn = host=127.0.0.1 dbname=powa\n")
    return config.load(path)


def section(text: str) -> dict[str, str]:
    lines = [line.split(" = ", 1) for line in text.splitlines() if " = " in line
             and not line.startswith(";")]
    return {key: value.replace("%%", "%") for key, value in lines}


def test_a_worker_runs_optimized_with_one_arena_and_a_fleet_bytecode_cache(
        tmp_path: Path) -> None:
    directory = tmp_path / "a, 50%"
    directory.mkdir()
    cfg = load(directory)
    program = section(files.render_worker(cfg, 7, "/usr/bin/python3"))
    assert shlex.split(program["command"])[:4] == ["/usr/bin/python3", "-OO", "-m",
                                                    "collector.worker"]
    # read back as supervisord reads it
    assert dict_of_key_value_pairs(program["environment"]) == {
        "POWA_FLEET_SPAWNER": "1",
        "MALLOC_ARENA_MAX": "1",
        "PYTHONPYCACHEPREFIX": str(directory / ".bytecode"),
        "PYTHONDONTWRITEBYTECODE": "",
    }


def test_the_spawner_is_the_workers_interpreter_and_can_be_turned_off(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    text = files.render_supervisord(cfg, "/usr/bin/python3", 3)
    start = text.index("[program:spawner]")
    spawner = section(text[start:text.index("\n\n", start)])
    assert shlex.split(spawner["command"])[:4] == ["/usr/bin/python3", "-OO", "-m",
                                                   "collector.worker.spawner"]
    assert spawner["priority"] == "800"
    # the workers' settings, since it is their interpreter; not the mark of being forked
    assert dict_of_key_value_pairs(spawner["environment"]) == {
        "MALLOC_ARENA_MAX": "1",
        "PYTHONPYCACHEPREFIX": str(tmp_path / ".bytecode"),
        "PYTHONDONTWRITEBYTECODE": "",
    }
    (tmp_path / "collector.cfg").write_text(
        "[repository]\ndsn = host=127.0.0.1 dbname=powa\n[fleet]\nspawner = false\n")
    off = config.load(tmp_path / "collector.cfg")
    assert "[program:spawner]" not in files.render_supervisord(off, "/usr/bin/python3", 3)
    worker = section(files.render_worker(off, 7, "/usr/bin/python3"))
    assert "POWA_FLEET_SPAWNER" not in dict_of_key_value_pairs(worker["environment"])


def test_warm_writes_what_a_worker_imports_at_its_optimization_level(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert bytecode.warm(cfg, sys.executable)
    cached = {path.name for path in (tmp_path / ".bytecode").rglob("*.pyc")}
    tag = sys.implementation.cache_tag
    assert {f"loop.{tag}.opt-2.pyc", f"client.{tag}.opt-2.pyc"} <= cached
    assert all(".opt-2." in name for name in cached)
