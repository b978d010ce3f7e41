"""The workers' bytecode cache, made before hundreds of workers start at once.

Workers run ``python -OO`` with ``PYTHONPYCACHEPREFIX`` at the fleet's
``.bytecode/`` (see ``files.worker_environment``): the ``.opt-2.pyc`` files
that neither Debian's stdlib nor pip's install provide are written there by
whoever imports a module first.  ``warm()`` is that first import, done once
by the generator, so that a fleet's first start does not compile the same
few hundred modules in every worker.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from collector.config import Config
from collector.fleet.files import BYTECODE_DIR, WORKER_FLAGS, Report, worker_environment

log = logging.getLogger(__name__)

#: what a worker imports at start, and the whole package (a snapshot and the
#: plugins import a few more of its modules later)
WARM = ("import compileall, collector, collector.worker.loop;"
        " compileall.compile_dir(collector.__path__[0], quiet=1)")
TIMEOUT = 120


def warm(cfg: Config, python: str) -> bool:
    """Fill the workers' bytecode cache as a worker would; False (logged) if it failed."""
    environment = {**os.environ, **worker_environment(cfg)}
    try:
        result = subprocess.run([python, *WORKER_FLAGS, "-c", WARM], env=environment,
                                capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not compile the workers' bytecode (each will compile it): %s", exc)
        return False
    if result.returncode != 0:
        log.warning("could not compile the workers' bytecode (each will compile it): %s",
                    result.stderr.strip().splitlines()[-1:] or result.returncode)
        return False
    return True


def warm_for(cfg: Config, report: Report, python: str = sys.executable) -> None:
    """Warm the cache before new workers start (or when it is missing); cheap when full."""
    if report.added or not (cfg.directory / BYTECODE_DIR).is_dir():
        warm(cfg, python)
