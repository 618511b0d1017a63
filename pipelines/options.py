"""Option parsing shared by the `pipe` commands (KEY=VALUE lists, sizes). Glue only."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
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


def _plain(tp: Any) -> type:
    """int | None -> int (None is "not given" on the command line)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _flag(name: str, tp: type) -> tuple[str, ...]:
    opt = "--" + name.replace("_", "-")
    return (f"{opt}/--no-{name.replace('_', '-')}",) if tp is bool else (opt,)


def dataclass_options(configs: list[type], label: Callable[[type], str] | None = None) -> list[inspect.Parameter]:
    """One typer option per field of the given dataclasses (default None = "not given": the dataclass's default
    applies); help is the field's `metadata["help"]` plus the default, per dataclass when `label` names them, so
    defaults and help are written once, in the dataclass. A field with `metadata["size"]` takes sizes such as 8G."""
    seen: dict[str, dict[str, Any]] = {}
    for cls in configs:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            entry = seen.setdefault(f.name, {"type": _plain(hints[f.name]), "help": [], "defaults": [], "size": False})
            if f.metadata.get("help") and f.metadata["help"] not in entry["help"]:
                entry["help"].append(f.metadata["help"])
            entry["size"] = entry["size"] or bool(f.metadata.get("size"))
            default = f.default if f.default is not dataclasses.MISSING else None
            entry["defaults"].append((label(cls) if label else None, default))
    params = []
    for name, e in seen.items():
        shown = [f"{who}: {d}" if who else f"{d}" for who, d in e["defaults"] if d is not None]
        text = " ".join(e["help"]) + (f" [{', '.join(shown)}]" if shown else "")
        tp = str if e["size"] else e["type"]
        option = typer.Option(None, *_flag(name, tp), help=text, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp | None))
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
