"""Tiny replicas of the real datasets, written in their authors' on-disk formats (file names, JSON keys, palette
PNG masks with 255 borders, binary/pickle batches), for reader tests and for `pipe reproduce` on the paper recipe.

Each module here covers one or more reader names and exposes:
    NAMES: tuple[str, ...]            reader names (as registered in pipe_align.extract.datasets) it covers
    build(root: Path, name: str) -> Path
        write a replica of dataset `name` under `root` (a fresh folder) and return the path a user passes as --root
`replica(name, root)` finds the module for a reader name.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path


def builders() -> dict[str, object]:
    """Reader name -> the replica module that builds it (every module in this package)."""
    out: dict[str, object] = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(mod, "NAMES", ()):
            if name in out:
                raise RuntimeError(f"replica for {name} defined twice: {out[name].__name__} and {mod.__name__}")
            out[name] = mod
    return out


def replica(name: str, root: Path) -> Path:
    """Write the replica of reader `name` under `root`; the --root to pass."""
    mods = builders()
    if name not in mods:
        raise KeyError(f"no replica for {name}; have {sorted(mods)}")
    return mods[name].build(Path(root), name)
