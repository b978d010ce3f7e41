"""psycopg's version modules, without the ``importlib.metadata`` they import.

``psycopg/version.py`` and ``psycopg_binary/version.py`` set ``__version__``
with ``importlib.metadata.version()``: every process of the fleet imports
``importlib.metadata``, ``email``, ``zipfile`` and ``csv`` for two strings
(about 20 ms of a worker's start, and their memory, hundreds of times over).
``install()`` puts a finder first on ``sys.meta_path`` that answers these two
imports, and only those, with a module carrying the same ``__version__``,
read from the ``Version:`` line of the distribution's ``METADATA``, found on
``sys.path`` the way ``importlib.metadata`` finds it.

It degrades, never breaks: a version module whose code is not the one
expected below (a new release), a distribution found elsewhere than beside
its package, an ``.egg-info``, any error: the finder steps aside and the real
module is imported.  ``tests/unit/test_psycopgversion.py`` fails then, so
that we notice.  Imported by ``collector/__init__.py``, before any psycopg.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from importlib.machinery import ModuleSpec

#: typing and pathlib cost every process of the fleet ~25 ms to import, the
#: workers' stand-ins included, which need neither: pathlib is imported when a
#: version module is asked for, typing never (mypy reads this name as typing's)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

#: module -> the distribution whose version it reports
DISTRIBUTIONS = {
    "psycopg.version": "psycopg",
    "psycopg_binary.version": "psycopg-binary",
}


def expected_code(distribution: str) -> list[str]:
    """The code lines of a version module this finder may stand in for."""
    return [
        "from importlib import metadata",
        "try:",
        f'    __version__ = metadata.version("{distribution}")',
        "except metadata.PackageNotFoundError:",
        '    __version__ = "0.0.0.0"',
    ]


def code_lines(text: str) -> list[str]:
    """``text`` without its docstring, comments and blank lines."""
    if text.lstrip().startswith('"""'):
        text = text.lstrip()[3:].split('"""', 1)[-1]
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _normalized(name: str) -> str:
    # as importlib.metadata's Prepared.normalize, without re
    for separator in ".-":
        name = name.replace(separator, "_")
    while "__" in name:
        name = name.replace("__", "_")
    return name.lower()


def metadata_dir(distribution: str, paths: Sequence[str]) -> Path | None:
    """The first ``<name>-<version>.dist-info`` of ``distribution`` on ``paths``.

    None when the first directory holding one holds an ``.egg-info`` or several.
    """
    wanted = _normalized(distribution)
    for entry in paths:
        try:
            # names, not Path objects: the standard library's directory is long
            children = os.listdir(entry or ".")  # noqa: PTH208
        except OSError:
            # not a directory: importlib.metadata would look into a zip file, we do not
            continue
        found = [child for child in children
                 if child.lower().endswith((".dist-info", ".egg-info"))
                 and _normalized(child.lower().rpartition(".")[0].partition("-")[0]) == wanted]
        if found:
            # two copies side by side: which one importlib.metadata reads is the listing's order
            if len(found) > 1 or not found[0].lower().endswith(".dist-info"):
                return None
            from pathlib import Path  # noqa: PLC0415 (see TYPE_CHECKING)

            return Path(entry or ".", found[0])
    return None


def read_version(dist_info: Path) -> str | None:
    """The ``Version:`` header of a dist-info's ``METADATA``."""
    with (dist_info / "METADATA").open(encoding="utf-8") as metadata:
        for line in metadata:
            if not line.strip():
                break
            name, _, value = line.partition(":")
            if name.strip().lower() == "version":
                return value.strip() or None
    return None


def stand_in_version(module: str, package_path: Sequence[str],
                     paths: Sequence[str]) -> str | None:
    """The version ``module`` would report, or None if it cannot be told without importing it."""
    distribution = DISTRIBUTIONS[module]
    if len(package_path) != 1:
        return None
    from pathlib import Path  # noqa: PLC0415 (see TYPE_CHECKING)

    package_dir = Path(package_path[0])
    if code_lines((package_dir / "version.py").read_text(encoding="utf-8")) != expected_code(
            distribution):
        return None
    dist_info = metadata_dir(distribution, paths)
    if dist_info is None or not dist_info.parent.samefile(package_dir.parent):
        # importlib.metadata would read another copy's version
        return None
    return read_version(dist_info)


class VersionFinder:
    """A meta path finder for the version modules of ``DISTRIBUTIONS`` only."""

    def __init__(self) -> None:
        self.served: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in DISTRIBUTIONS or path is None:
            return None
        try:
            version = stand_in_version(fullname, list(path), sys.path)
        except Exception:
            version = None
        if version is None:
            # the real module, importlib.metadata and all
            return None
        spec = ModuleSpec(fullname, self,  # type: ignore[arg-type]
                          origin="collector.psycopgversion")
        spec.loader_state = version
        return spec

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        assert module.__spec__ is not None
        setattr(module, "__version__", module.__spec__.loader_state)  # noqa: B010
        self.served.add(module.__name__)
        if self.served == set(DISTRIBUTIONS) and self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> VersionFinder | None:
    """Answer the version modules' imports from now on (unless one is imported already)."""
    if any(name in sys.modules for name in DISTRIBUTIONS):
        return None
    if any(isinstance(finder, VersionFinder) for finder in sys.meta_path):
        return None
    finder = VersionFinder()
    sys.meta_path.insert(0, finder)
    return finder
