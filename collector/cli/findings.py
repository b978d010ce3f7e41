"""What ``powa-fleet check`` reports: one finding per item, with a verdict and what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from collector.cli.text import printable

OK = "ok"
WARNING = "warning"
FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    verdict: str
    #: what was checked: "config", "repository", "server 3 ('db3', host:5432)", ...
    item: str
    message: str
    #: what to do about it (empty when all is well)
    hint: str = ""

    def line(self) -> str:
        text = f"{self.item}: {self.message}"
        return f"{self.verdict:<7} " + printable(f"{text} -> {self.hint}" if self.hint else text)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ok(item: str, message: str) -> Finding:
    return Finding(OK, item, message)


def warning(item: str, message: str, hint: str) -> Finding:
    return Finding(WARNING, item, message, hint)


def fail(item: str, message: str, hint: str) -> Finding:
    return Finding(FAIL, item, message, hint)
