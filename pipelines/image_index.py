"""The image side of `pipe search`: a folder's images encoded once and kept next to the run, reused while they are
unchanged.

`RUN/cache/search-<digest of the folder's path>.safetensors` holds the embeddings [n, E] and, in its metadata, the
files they belong to (path relative to the folder, size, mtime in ns), the files that were unreadable, and a key of
what the embeddings depend on (the run's training key and weights file, the image encoder record, the method). On the
next search only new or changed files are encoded; removed files drop out; a different key discards the cache. The
file is replaced atomically, so an interrupted search leaves the previous cache intact.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pipe_align.extract.datasets.base import IMAGE_SUFFIXES
from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_bytes
from pipe_align.pipelines.api import AlignedModel


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted); a missing folder or one without images is a PipeError."""
    if not folder.is_dir():
        raise PipeError(f"{folder}: no such folder")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise PipeError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


@dataclass
class FolderEmbeddings:
    paths: list[Path]  # readable images, in the order of the rows of `embeddings`
    embeddings: Tensor
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    encoded: int = 0  # images encoded now (the rest came from the cache)
    cache: Path | None = None


def cache_file(model: AlignedModel, folder: Path) -> Path:
    return model.run / "cache" / f"search-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.safetensors"


def model_key(model: AlignedModel) -> str:
    """What the embeddings depend on besides the images."""
    weights = model.run / model.aligner.weights_file
    st = weights.stat() if weights.exists() else None
    what = {"key": model.meta.get("key"), "weights": [st.st_size, st.st_mtime_ns] if st else None,
            "method": model.method, "image": model.image_spec.recorded, "resize": model.resize}  # fmt: skip
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path, key: str) -> tuple[dict[str, int], Tensor | None, dict[str, list]]:
    """(file -> row, embeddings, file -> [size, mtime, reason] of unreadable ones) of a valid cache, else empty."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["index"])
            emb = f.get_tensor("embeddings")
    except (OSError, KeyError, ValueError, SafetensorError):
        return {}, None, {}  # no cache, or a damaged one: encode again
    if meta.get("key") != key or len(meta.get("files", [])) != len(emb):
        return {}, None, {}
    rows = {tuple(f): i for i, f in enumerate(meta["files"])}
    return rows, emb, {tuple(s[:3]): s[3] for s in meta.get("skipped", [])}


def folder_embeddings(model: AlignedModel, folder: Path, strict: bool = False, use_cache: bool = True,
                      on_images: Callable[[int], None] | None = None) -> FolderEmbeddings:  # fmt: skip
    """Embeddings of every readable image under `folder`, from the cache where a file is unchanged."""
    paths = list_images(folder)
    stamp = {p: (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths}
    key, path = model_key(model), cache_file(model, folder)
    rows, cached, bad = _read(path, key) if use_cache else ({}, None, {})
    todo = [p for p in paths if stamp[p] not in rows and stamp[p] not in bad]
    if on_images:
        on_images(len(paths) - len(todo))
    emb, kept, skipped = model.encode_files(todo, skip_unreadable=not strict, on_images=on_images)
    new = {todo[i]: emb[j] for j, i in enumerate(kept)}
    reasons = {todo[i]: why for i, why in skipped} | {p: bad[stamp[p]] for p in paths if stamp[p] in bad}
    readable = [p for p in paths if p in new or stamp[p] in rows]
    if not readable:
        raise PipeError(f"{folder}: none of its {len(paths)} images is readable")
    out = torch.stack([new[p] if p in new else cached[rows[stamp[p]]].to(model.device) for p in readable])
    result = FolderEmbeddings(readable, out, [(p, reasons[p]) for p in paths if p in reasons], len(todo))
    changed = todo or len(rows) + len(bad) != len(paths)
    if use_cache and changed:
        result.cache = _write(path, key, folder, out, [stamp[p] for p in readable],
                              [[*stamp[p], reasons[p]] for p in paths if p in reasons])  # fmt: skip
    elif use_cache:
        result.cache = path
    return result


def _write(path: Path, key: str, folder: Path, emb: Tensor, files: list, skipped: list) -> Path | None:
    """Atomically replace the cache; a run dir we cannot write to just means no cache (None)."""
    from safetensors.torch import save

    meta = {"key": key, "folder": str(folder.resolve()), "files": files, "skipped": skipped}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": emb.detach().float().cpu().contiguous()}
        write_bytes(path, save(tensors, metadata={"index": json.dumps(meta)}))
    except (OSError, PipeError):
        return None
    return path
