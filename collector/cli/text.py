"""Untrusted text made safe for a terminal (aliases, host names, error messages)."""

from __future__ import annotations

from collector.logs import REDACTOR


def printable(text: object) -> str:
    """One line, no control character (no escape sequence reaches the terminal), redacted."""
    if text is None or text == "":
        return "-"
    flat = " ".join(str(text).split())
    return REDACTOR.redact("".join(c if c.isprintable() else "?" for c in flat))


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
