"""What a worker program's process and the fleet's spawner say to each other.

The spawner (``collector.worker.spawner``) forks the workers; each worker
program's process (``collector.worker.stub``) asks it for one over
``<fleet directory>/.spawner.sock`` and stands for it.  The generator (fleet
side) marks the workers of a fleet that has a spawner.  Standard library only:
the stub must stay light.

A request is its length, then NUL-separated fields: the working directory,
the number of arguments, the arguments, then ``KEY=VALUE`` of the
environment; the stub's stdin, stdout and stderr travel with it
(``SCM_RIGHTS``).  The answers are frames of a kind and an integer: ``P``
and the worker's pid once it exists, ``X`` and its exit code at its end.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence

#: the spawner's socket, in the fleet directory (beside collector.cfg)
SOCKET_NAME = ".spawner.sock"
#: set (to 1) by the generator in the workers' environment: this fleet has a spawner
ENV_SPAWNER = "POWA_FLEET_SPAWNER"
#: the pid supervisord knows this worker by, in a forked worker's environment
ENV_PROGRAM_PID = "POWA_FLEET_PROGRAM_PID"
#: the first answer: "P" and the worker's pid; the last: "X" and its exit code
PID = b"P"
EXIT = b"X"
FRAME = struct.Struct("!ci")
#: the request: its length, then NUL-separated fields (cwd, argc, argv..., KEY=VALUE...)
LENGTH = struct.Struct("!I")


def program_pid() -> int:
    """The pid supervisord shows for this worker's program (a forked worker's stand-in)."""
    value = os.environ.get(ENV_PROGRAM_PID, "")
    return int(value) if value.isdigit() else os.getpid()


#: supervised workers (and their stand-ins) run this much nicer than the control,
#: supervisord and its event listener: on a saturated host (hundreds starting, a burst
#: of snapshots) those answer powa-web and keep the fleet's picture; a worker can wait
NICE = 10


def be_nice() -> None:
    """Run at ``NICE`` (never less nice than now: a stand-in that runs its worker itself)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < NICE:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except OSError:
        pass


def config_path(argv: Sequence[str]) -> str | None:
    """The value of ``-c``/``--config`` in ``argv`` (argparse's spellings), if any."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        for prefix in ("--config=", "-c"):
            if arg.startswith(prefix) and len(arg) > len(prefix) and arg != "--config":
                return arg[len(prefix):]
    return None


def socket_path(config: str | None) -> str | None:
    """The spawner's socket for the configuration file ``config`` (None: no file named)."""
    if not config:
        return None
    # os.path, not pathlib: the stand-in imports nothing it can do without
    directory = os.path.dirname(os.path.abspath(config))  # noqa: PTH100, PTH120
    return os.path.join(directory, SOCKET_NAME)  # noqa: PTH118


def encode_request(cwd: str, argv: Sequence[str], environ: Mapping[str, str]) -> bytes:
    fields = [cwd, str(len(argv)), *argv, *(f"{key}={value}" for key, value in environ.items())]
    payload = b"\0".join(os.fsencode(field) for field in fields)
    return LENGTH.pack(len(payload)) + payload


def decode_request(payload: bytes) -> tuple[str, list[str], dict[str, str]]:
    """(cwd, argv, environment) of a request; ValueError when it is not one."""
    fields = [os.fsdecode(field) for field in payload.split(b"\0")]
    if len(fields) < 2 or not fields[1].isdigit() or len(fields) < 2 + int(fields[1]):
        raise ValueError("malformed spawn request")
    argc = int(fields[1])
    argv = fields[2:2 + argc]
    environ = dict(item.split("=", 1) for item in fields[2 + argc:] if "=" in item)
    return fields[0], argv, environ
