"""Every alignment method, by name. Each method module registers its class with `@register_method("name")` and is
imported here by name, so that importing this module fills the registry; a new method is one new file in align/ and
one line in the import list below.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipe_align.extract.errors import PipeError

from . import (  # noqa: F401  (each import registers its methods; keep sorted)
    asif,
    cca,
    contrastive,
    pal,
    pal_fixed,
    procrustes,
    sotalign,
)
from .base import METHODS, Aligner


def method_names() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[Aligner]:
    """The method class registered under `name`; an unknown name lists the valid ones."""
    return METHODS.get(name)


def load_aligner(run: str | Path, device: str = "cpu") -> Aligner:
    """Read any method's run dir back (method.json names the class and its config, the weights file its tensors):
    the method is built from its config (`Aligner.blank`) and the file loaded into it with torch's
    `load_state_dict(strict=True)`, then frozen (no gradients, eval mode) on `device`. A damaged or mixed run dir
    (malformed or mistyped method.json, an unreadable, empty or non-finite weights file, a tensor missing, extra or of
    another shape than the config gives it) is a one-line PipeError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .base import state_mismatch

    run = Path(run)
    meta_path = run / "method.json"
    if not meta_path.is_file():
        raise PipeError(f"{run}: not a run dir (no method.json); train one with `pipe align`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipeError(f"{meta_path}: malformed JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise PipeError(f'{meta_path}: not a method description (an object with a "method" name)')
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise PipeError(f'{meta_path}: "config" must be an object, got {type(config).__name__}')
    try:
        cls = get_method(meta["method"])
        method_config = cls.config_from_dict(config)
    except PipeError as e:
        raise PipeError(f"{meta_path}: {e}") from None
    weights = run / cls.weights_file
    if not weights.is_file():
        raise PipeError(f"{weights}: missing (training did not finish, or {meta_path.name} names another method?)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise PipeError(f"{weights}: not a readable safetensors file ({e})") from None
    if not state:
        raise PipeError(f"{weights}: holds no tensors")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PipeError(f"{weights}: tensor {key!r} holds non-finite values")
    not_theirs = f"{weights}: does not hold the tensors of a {cls.name} run as {meta_path.name} configures it"
    try:
        aligner = cls.blank(method_config, {k: tuple(v.shape) for k, v in state.items()})
        problem = state_mismatch(aligner.state_dict(), state)
        if problem:
            raise PipeError(problem)
        aligner.load_state_dict(state, strict=True)
    except PipeError as e:
        raise PipeError(f"{not_theirs} ({e})") from None
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        raise PipeError(f"{not_theirs} ({type(e).__name__}: {' '.join(str(e).split())})") from None
    return aligner.requires_grad_(False).eval().to(device)
