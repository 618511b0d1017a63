"""Option parsing shared by the `pipe` commands (KEY=VALUE lists, sizes). Glue only."""

from __future__ import annotations

import json

from pipe_align.extract.errors import PipeError


def parse_options(items: list[str], flag: str = "--option") -> tuple[tuple[str, object], ...]:
    """KEY=VALUE items (values parsed as JSON where they are), sorted by key; a repeated key keeps its last value."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PipeError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            parsed: object = json.loads(value)
        except ValueError:
            parsed = value
        out[key] = parsed
    return tuple(sorted(out.items()))


def parse_bytes(text: str | None, flag: str = "--memory-budget") -> int | None:
    """A size such as 512M, 8G or 1.5GiB in bytes (None passes through)."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except (ValueError, OverflowError):
        raise PipeError(f"{flag} expects a size like 512M or 8G, got {text!r}") from None
