"""psycopg's version modules stood in for (collector.psycopgversion): same versions, no metadata.

A process of the fleet must not import ``importlib.metadata`` (and email,
zipfile, csv) for psycopg's two version strings.  When a psycopg release
changes how its version modules work, the finder steps aside and the real
modules are imported: the fleet still runs, and these tests fail so that we
notice.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from collector import psycopgversion

PACKAGE = Path(__file__).resolve().parents[2] / "collector"

PROBE = """
import json, sys
import collector, psycopg, psycopg_binary
stood_in = {name: type(sys.modules[name].__spec__.loader).__name__
            for name in ("psycopg.version", "psycopg_binary.version")}
metadata_imported = "importlib.metadata" in sys.modules
from importlib import metadata
print(json.dumps({
    "stood_in": stood_in,
    "metadata_imported": metadata_imported,
    "versions": [psycopg.__version__, psycopg.version.__version__,
                 psycopg_binary.__version__, psycopg.pq.__impl__],
    "expected": [metadata.version("psycopg"), metadata.version("psycopg-binary")],
    "finder_left": [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "VersionFinder"],
}))
"""


def probe(code: str) -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=PACKAGE.parent, timeout=60)
    return dict(json.loads(result.stdout))


def test_the_stand_ins_report_what_importlib_metadata_says() -> None:
    answer = probe(PROBE)
    expected = answer["expected"]
    assert isinstance(expected, list)
    psycopg, binary = expected
    assert answer == {
        "stood_in": {"psycopg.version": "VersionFinder",
                     "psycopg_binary.version": "VersionFinder"},
        "metadata_imported": False,
        "versions": [psycopg, psycopg, binary, "binary"],
        "expected": [psycopg, binary],
        "finder_left": [],
    }, "psycopg's version modules are no longer stood in for: see collector/psycopgversion.py"


@pytest.mark.parametrize("module", sorted(psycopgversion.DISTRIBUTIONS))
def test_the_installed_version_modules_are_the_expected_code(module: str) -> None:
    package = module.partition(".")[0]
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations is not None
    source = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    distribution = psycopgversion.DISTRIBUTIONS[module]
    assert psycopgversion.code_lines(source.read_text()) == psycopgversion.expected_code(
        distribution), f"{source} changed: is the stand-in of collector/psycopgversion.py right?"
    version = psycopgversion.stand_in_version(
        module, list(spec.submodule_search_locations), sys.path)
    assert version == importlib.metadata.version(distribution)


def fake_install(root: Path, code: str, dist_info: str = "psycopg-1.2.3.dist-info") -> Path:
    """A site directory holding a package ``fakepg`` with ``version.py`` and its dist-info."""
    package = root / "fakepg"
    package.mkdir(parents=True)
    (package / "version.py").write_text(code)
    (root / dist_info).mkdir()
    (root / dist_info / "METADATA").write_text(
        "Metadata-Version: 2.4\nName: psycopg\nVersion: 1.2.3\n\nVersion: 9.9.9 in the body\n")
    return package


EXPECTED = '''"""
psycopg distribution version file.
"""

# Copyright (C) 2020 The Psycopg Team

from importlib import metadata

try:
    __version__ = metadata.version("psycopg")
except metadata.PackageNotFoundError:
    __version__ = "0.0.0.0"
'''


def test_the_version_is_read_from_the_metadata_beside_the_package(tmp_path: Path) -> None:
    package = fake_install(tmp_path / "site", EXPECTED)
    assert psycopgversion.stand_in_version(
        "psycopg.version", [str(package)], [str(tmp_path / "nowhere"), str(tmp_path / "site")],
    ) == "1.2.3"


def test_a_changed_version_module_is_imported_for_real(tmp_path: Path) -> None:
    package = fake_install(tmp_path / "site", EXPECTED.replace('"0.0.0.0"', '"0.0.0"'))
    assert psycopgversion.stand_in_version(
        "psycopg.version", [str(package)], [str(tmp_path / "site")]) is None


def test_metadata_found_before_the_package_is_imported_for_real(tmp_path: Path) -> None:
    package = fake_install(tmp_path / "site", EXPECTED)
    (tmp_path / "earlier" / "psycopg-0.9.dist-info").mkdir(parents=True)
    assert psycopgversion.stand_in_version(
        "psycopg.version", [str(package)], [str(tmp_path / "earlier"), str(tmp_path / "site")],
    ) is None


@pytest.mark.parametrize("dist_info", ["psycopg-1.2.3.egg-info", "Psycopg-1.2.3.dist-info"])
def test_only_a_lone_dist_info_is_read(tmp_path: Path, dist_info: str) -> None:
    package = fake_install(tmp_path / "site", EXPECTED, dist_info="psycopg-1.2.3.dist-info")
    (tmp_path / "site" / dist_info.replace("1.2.3", "1.2.4")).mkdir()
    assert psycopgversion.stand_in_version(
        "psycopg.version", [str(package)], [str(tmp_path / "site")]) is None


def test_psycopg_already_imported_is_used_as_it_is() -> None:
    code = ("import json, sys, psycopg; from collector import psycopgversion;"
            " print(json.dumps({'installed': psycopgversion.install() is not None,"
            " 'loader': type(psycopg.version.__spec__.loader).__name__}))")
    assert probe(code) == {"installed": False, "loader": "SourceFileLoader"}
