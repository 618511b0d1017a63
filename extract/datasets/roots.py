"""Where under `--root` a dataset really lives: the documented sub-paths users commonly give one level too high or
too low (torchvision's FashionMNIST/raw, ADE20K's nested ADEChallengeData2016, Kaggle's flickr30k_images twice,
Karpathy's caption_datasets/), tried in one place so that every reader answers a wrong level the same way.

Exactly one candidate may fit: none is a one-line error saying what was expected where, two are an error too (two
copies of a dataset under one root would silently pick one of them otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import PipeError


def find_under(name: str, root: Path, candidates: Sequence[str], fits: Callable[[Path], bool], expected: str) -> Path:
    """The one folder `root / c` (c in `candidates`, "." = root itself) for which `fits` holds.

    `expected` names what a fitting folder holds, relative to it (e.g. "images/validation and
    annotations/validation"); the error lists the folders tried."""
    found: list[Path] = []
    for cand in candidates:
        path = root if cand in ("", ".") else root / cand
        if path.is_dir() and path not in found and fits(path):
            found.append(path)
    if len(found) > 1:
        raise PipeError(
            f"dataset '{name}': {expected} found in {len(found)} places under {root} ("
            f"{', '.join(str(p) for p in found)}); point --root at the one to use"
        )
    if not found:
        subs = [f"{c}/" for c in candidates if c not in ("", ".")]
        where = f"{root}" + (" itself" if len(subs) < len(candidates) else "")
        where += f" or in its sub-folder {' or '.join(subs)}" if subs else ""
        raise PipeError(f"dataset '{name}': expected {expected} in --root {where}")
    return found[0]


def has_files(*names: str) -> Callable[[Path], bool]:
    """A `fits` test: the folder holds at least one of `names` (files or folders)."""
    return lambda path: any((path / n).exists() for n in names)


def has_all(*names: str) -> Callable[[Path], bool]:
    """A `fits` test: the folder holds every one of `names` (files or folders)."""
    return lambda path: all((path / n).exists() for n in names)
