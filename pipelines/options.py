"""Option parsing shared by the `pipe` commands (KEY=VALUE lists, sizes). Glue only."""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

import typer

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


def _flag(name: str, tp: type) -> tuple[str, ...]:
    opt = "--" + name.replace("_", "-")
    return (f"{opt}/--no-{name.replace('_', '-')}",) if tp is bool else (opt,)


PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
METAVARS = {"int": "INT", "float": "NUMBER", "str": "TEXT", "size": "SIZE"}


def spec_options(entries: list[dict[str, Any]]) -> list[inspect.Parameter]:
    """One typer option per entry of `cli_spec` (name, type, help, panel): the registries' options without importing
    them. Default None = "not given": the config dataclass's default (or the recipe) applies."""
    params = []
    for e in entries:
        tp = str if e["size"] else PY_TYPES[e["type"]]
        metavar = None if tp is bool else METAVARS["size" if e["size"] else e["type"]]
        option = typer.Option(
            None, *_flag(e["name"], tp), help=e["help"], show_default=False, metavar=metavar, rich_help_panel=e["panel"]
        )
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(e["name"], kind, default=option, annotation=tp | None))
    return params


def with_options(*groups: list[inspect.Parameter]) -> Callable[[Callable], Callable]:
    """Adds generated options to a typer command: the command receives them in `**options`."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        extra = [p for group in groups for p in group if p.name not in sig.parameters]
        hints = typing.get_type_hints(fn)

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=own + extra)
        command.__annotations__ = {p.name: hints.get(p.name, p.annotation) for p in own}
        command.__annotations__ |= {p.name: p.annotation for p in extra}
        return command

    return deco
