"""What the benchmarks share: sandbox clusters, upstream powa-collector, tables, memory."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UPSTREAM_VERSION = "1.3.2"
UPSTREAM_VENV = Path(os.environ.get("POWA_FLEET_UPSTREAM_VENV", "/tmp/powa-fleet-upstream-venv"))


def upstream_python() -> Path:
    """A venv with upstream powa-collector (PyPI), made on first use."""
    python = UPSTREAM_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(UPSTREAM_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import powa_collector, psycopg2"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        # upstream requires psycopg2 (a source build); the binary wheel is the same code
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                        f"powa-collector=={UPSTREAM_VERSION}", "psycopg2-binary"], check=True)
    return python


def machine() -> str:
    cpus = os.cpu_count()
    memory = ""
    try:
        with Path("/proc/meminfo").open() as handle:
            kib = int(handle.readline().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    except OSError:
        pass
    return (f"{model}{cpus} cores{memory}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def pss_kib(pid: int) -> int:
    """Proportional set size of a process, from /proc/<pid>/smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise ValueError("no Pss line")


def forked_workers(spawner: int) -> dict[int, int]:
    """srvid -> pid of the workers ``spawner`` forked (each names itself worker_N)."""
    found = {}
    children = Path(f"/proc/{spawner}/task/{spawner}/children").read_text().split()
    for child in children:
        try:
            comm = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("worker_") and comm.removeprefix("worker_").isdigit():
            found[int(comm.removeprefix("worker_"))] = int(child)
    return found


class ForkedWorkers:
    """The processes of each worker: supervisord's (the stand-in) and the spawner's child.

    ``spawner_pid`` tells the spawner's pid (None: no spawner); the children
    are read again whenever a worker's is not found, or is gone.
    """

    def __init__(self, spawner_pid: Callable[[], int | None]) -> None:
        self.spawner_pid = spawner_pid
        self.forked: dict[int, int] = {}

    def pids(self, srvid: int, program_pid: int) -> list[int]:
        forked = self.forked.get(srvid)
        if forked is None or not Path(f"/proc/{forked}").exists():
            spawner = self.spawner_pid()
            self.forked = forked_workers(spawner) if spawner else {}
            forked = self.forked.get(srvid)
        return [program_pid] if forked is None else [program_pid, forked]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True))
                 + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     + " |")
    return "\n".join(lines) + "\n"


def header(name: str) -> str:
    return (f"## {name}\n\n{time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}; "
            f"PostgreSQL 15 + PoWA 4.1.4, upstream powa-collector {UPSTREAM_VERSION}\n")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
