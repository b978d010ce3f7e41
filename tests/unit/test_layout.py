"""The house rule: a path says which process a line runs in, and the sides never mix.

``collector/worker`` (one process per server) and ``collector/fleet`` (files
and supervisord) use only the shared modules at ``collector/`` itself; the
control uses the shared modules and the fleet; shared modules use no side.
The operator commands (``cli``) may read the control's and the fleet's
views; the demo may use anything, and nothing running uses the demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "collector"
SIDES = ("worker", "control", "fleet", "cli", "demo", "plugins", "metrics")
#: the rooms each room may import from, besides itself
ALLOWED = {
    "shared": {"shared"},
    "plugins": {"shared"},
    "worker": {"shared", "plugins"},
    "fleet": {"shared"},
    # the Prometheus endpoint reads Redis only
    "metrics": {"shared"},
    "control": {"shared", "fleet"},
    "cli": {"shared", "fleet", "control"},
    "demo": {"shared", "fleet", "control", "cli", "worker", "plugins", "metrics"},
}


def room(module: str) -> str:
    """The room of a dotted module name of the package."""
    parts = module.split(".")
    if module == "collector.__main__":
        # ``python -m collector``: the operator commands
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in SIDES else "shared"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every collector module a file imports (``from collector import x`` counts as x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("collector")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            "collector"
        ):
            found.add(node.module)
            if node.module == "collector":
                found |= {f"collector.{alias.name}" for alias in node.names}
    return found


def violations(path: Path) -> list[str]:
    here = room(module_name(path))
    return sorted(
        f"{module_name(path)} ({here}) imports {target} ({room(target)})"
        for target in imported(path)
        if room(target) != here and room(target) not in ALLOWED[here]
    )


def test_room_of_a_module_is_its_path() -> None:
    assert room("collector.worker.loop") == "worker"
    assert room("collector.keys") == "shared"
    assert room("collector") == "shared"
    assert room("collector.control") == "control"


def test_the_checker_sees_a_forbidden_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "collector" / "worker"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text(
        "from collector.control.board import StatusBoard\nfrom collector import keys, fleet\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "collector")
    assert violations(fake / "bad.py") == [
        "collector.worker.bad (worker) imports collector.control.board (control)",
        "collector.worker.bad (worker) imports collector.fleet (fleet)",
    ]


def test_no_module_imports_across_the_sides() -> None:
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in violations(path)]
    assert found == []
