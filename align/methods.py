"""Every alignment method, by name. Importing this module imports each module of align/ that registers a method
(`@register_method(...)` in its source), so a new method is one new file in align/ and no edit anywhere else."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import pipe_align.align
from pipe_align.align.base import METHODS, Aligner
from pipe_align.extract.errors import PipeError


def _import_method_modules() -> None:
    for info in pkgutil.iter_modules(pipe_align.align.__path__):
        path = Path(info.module_finder.path) / f"{info.name}.py"
        if path.is_file() and "@register_method(" in path.read_text():
            importlib.import_module(f"pipe_align.align.{info.name}")


_import_method_modules()


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[Aligner]:
    if name not in METHODS:
        raise PipeError(f"unknown method {name!r}; valid: {', '.join(method_names())}")
    return METHODS[name]


def load_aligner(run: str | Path, device: str = "cpu") -> Aligner:
    """Read any method's run dir back (method.json names the class)."""
    from safetensors.torch import load_file

    run = Path(run)
    meta_path = run / "method.json"
    if not meta_path.exists():
        raise PipeError(f"{run}: not a run dir (no method.json); train one with `pipe align`")
    meta = json.loads(meta_path.read_text())
    cls = get_method(meta["method"])
    aligner = cls.from_config_dict(meta.get("config", {}))
    weights = run / cls.weights_file
    if not weights.exists():
        raise PipeError(f"{run}: {cls.weights_file} is missing (training did not finish?)")
    aligner.load_state_dict({k: v.to(device) for k, v in load_file(str(weights)).items()})
    return aligner
