"""What the registries add to the command line (every method's options, every eval task, the names of methods,
datasets and encoders that help texts list), readable without torch.

`pipe --help` and every `--help` must answer at once, but the options of `pipe align`, the commands of `pipe eval` and
the choices help texts list come from the registries, and importing those loads torch, zarr and matplotlib (seconds).
`spec()` therefore reads them from a cache file keyed by the sha256 of the sources they are computed from (every .py
of align/, evaluate/, extract/, extract/datasets/ and extract/encoders/, and this file): an edited method config or
a new dataset reader changes the key, so the cache is never stale.
On a miss `build()` computes the spec from the registries (the reference; tests compare the two) and writes the
cache under `$PIPE_CACHE/cli/` (default `~/.cache/pipe/cli/`); an unwritable cache only costs the next call the same
seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

SOURCES = ("align", "evaluate", "extract", "extract/datasets", "extract/encoders")  # folders of the package
TYPES = {int: "int", float: "float", str: "str", bool: "bool"}


def cache_dir() -> Path:
    return Path(os.environ.get("PIPE_CACHE") or Path.home() / ".cache" / "pipe") / "cli"


def sources() -> list[Path]:
    """The files the spec is computed from: every .py of the SOURCES folders, and this file."""
    here = Path(__file__).resolve()
    folders = [here.parent.parent / name for name in SOURCES]  # pipelines/ sits beside align/, evaluate/, extract/
    return sorted({p for folder in folders for p in folder.glob("*.py")} | {here})


@functools.cache
def source_key() -> str:
    """sha256 over the paths and bytes of the files the spec is computed from (once per process: the CLI module and
    the eval commands both ask, and the sources do not change under a running command)."""
    h = hashlib.sha256()
    for path in sources():
        h.update(path.relative_to(Path(__file__).resolve().parent.parent).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def spec() -> dict[str, Any]:
    """The cached spec when its key matches the sources, else `build()` (and the cache is written)."""
    path = cache_dir() / f"{source_key()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    out = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: correct, only slower next time
    return out


def _plain(tp: Any) -> type:
    """int | None -> int (None is "not given" on the command line)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _fields(cls: type) -> list[dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = _plain(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(
            {
                "name": f.name,
                "type": TYPES.get(tp, "str"),
                "help": f.metadata.get("help", ""),
                "default": default,
                "size": bool(f.metadata.get("size")),
            }
        )
    return out


def _preset_defaults() -> dict[str, str]:
    """PAL options its --preset sets when the user leaves them out (its `preset_help`): what the help shows instead of
    one default."""
    from pipe_align.align.methods import get_method

    return dict(get_method("pal").preset_help)


def build() -> dict[str, Any]:
    """The spec from the live registries (imports align/ and evaluate/: seconds)."""
    from pipe_align.align.loop import RunConfig
    from pipe_align.align.methods import METHODS
    from pipe_align.evaluate.tasks import all_tasks
    from pipe_align.extract.datasets import DATASETS
    from pipe_align.extract.datasets.base import defines_boxes
    from pipe_align.extract.encoders.registry import ENCODERS

    methods = METHODS.values()
    methods.sort(key=lambda m: m.name != "pal")  # PAL's panel first, then the baselines by name
    groups: dict[type, list[str]] = {}
    for m in methods:
        groups.setdefault(m.Config, []).append(m.name)
    label = {cfg: "/".join(names) for cfg, names in groups.items()}
    small = _preset_defaults()
    options: dict[str, dict[str, Any]] = {}
    for cfg in groups:
        for f in _fields(cfg):
            o = options.setdefault(f["name"], {**f, "help": [], "defaults": [], "owners": []})
            if f["help"] and f["help"] not in o["help"]:
                o["help"].append(f["help"])
            o["owners"].append(label[cfg])
            if f["default"] is not None:
                o["defaults"].append((label[cfg], f["default"]))
    method_options = []
    for name, o in options.items():
        values = {v for _, v in o["defaults"]}
        if len(values) == 1 and len(o["defaults"]) == len(o["owners"]) and not (name in small and "pal" in o["owners"]):
            shown = str(next(iter(values)))
        else:
            shown = ", ".join(f"{who}: {v}" for who, v in o["defaults"] if not (who == "pal" and name in small))
        if name in small and "pal" in o["owners"]:
            pal = dict(o["defaults"]).get("pal")
            shown = f"pal: set by --preset (paper {pal}, small {small[name]})" + (f"; {shown}" if shown else "")
        owners = o["owners"]
        panel = (
            "PAL options"
            if owners == ["pal"]
            else f"Shared by {', '.join(owners)}"
            if len(owners) > 1
            else f"{owners[0]} options"
        )
        help_text = " ".join(o["help"]) + (f" [{shown}]" if shown else "")
        order = ("pal" not in owners, len(owners) > 1, panel)  # PAL's panels first, then one method's, then shared
        method_options.append(
            {"name": name, "type": o["type"], "size": o["size"], "help": help_text, "panel": panel, "order": order}
        )
    method_options.sort(key=lambda o: o.pop("order"))
    run_options = []
    run_defaults = {m.name: getattr(m, "run_defaults", None) for m in methods}
    for f in _fields(RunConfig):
        help_text = f["help"]
        if f["default"] is not None:
            help_text += f" [{f['default']}]"
        elif f["name"] in ("epochs", "batch_size", "patience"):
            per = [f"{n}: {d[f['name']]}" for n, d in run_defaults.items() if d and n != "pal"]
            help_text += f" [pal: set by --preset (paper {run_defaults['pal'][f['name']]}, small {small[f['name']]}); "
            help_text += ", ".join(per) + "]"
        run_options.append(
            {
                "name": f["name"],
                "type": f["type"],
                "size": f["size"],
                "help": help_text,
                "panel": "Run options (every method)",
            }
        )
    tasks = [
        {
            "name": t.name,
            "summary": (inspect.getdoc(t) or "").split("\n\n")[0].replace("\n", " "),
            "protocols": list(t.protocols),
        }
        for t in all_tasks()
    ]
    return {
        "run": run_options,
        "methods": method_options,
        "tasks": tasks,
        "method_names": [m.name for m in methods],  # PAL first
        "choices": {
            "method": sorted(METHODS.names(aliases=True), key=lambda n: n != "pal"),
            "dataset": DATASETS.names(aliases=True),
            "grounding": [n for n in DATASETS.names(aliases=True) if defines_boxes(DATASETS.get(n))],
            "encoder": ENCODERS.names(aliases=True),
        },
    }
