"""Stand-ins shared by the unit tests of the worker's parts."""

from __future__ import annotations


class FakeRemote:
    """A remote session that records what the watchdog asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cancel(self) -> None:
        self.calls.append("cancel")

    def abort(self) -> None:
        self.calls.append("abort")
