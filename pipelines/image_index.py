"""The image side of `pipe search`: a folder's images encoded once and kept next to the run, reused while they are
unchanged.

`RUN/cache/search-<digest of the folder's path>.safetensors` holds the embeddings [n, E] and, in its metadata, the
files they belong to (path relative to the folder, size, mtime in ns), the files that were unreadable, and a key of
what the embeddings depend on (the run's training key and weights file, the image encoder record and the dtype it
computes in, the method). On the next search only new or changed files are encoded; removed files drop out; a
different key discards the cache. The file is replaced atomically, so an interrupted search leaves the previous cache
intact. The index also holds a sha256 of itself and the rows; a cache whose checksum, structure, finiteness or unit
norms fail is damaged: it is not used, the folder is encoded again and the cache rewritten, and the command says so in
one line. What is not caught: an image replaced by another of the same size and mtime (the stamp is all that is
compared, as `make` compares).
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

from .api import AlignedModel


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
    cache_problem: str | None = None  # why a cache that was there was damaged and encoded again


def cache_file(model: AlignedModel, folder: Path) -> Path:
    return model.run / "cache" / f"search-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.safetensors"


def model_key(model: AlignedModel) -> str:
    """What the embeddings depend on besides the images."""
    weights = model.run / model.aligner.weights_file
    st = weights.stat() if weights.exists() else None
    what = {
        "key": model.meta.get("key"),
        "weights": [st.st_size, st.st_mtime_ns] if st else None,
        "method": model.method,
        "image": model.image_spec.recorded,
        "resize": model.resize,
        "compute_dtype": model.compute_dtypes["image"],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


NORM_TOL = 1e-3  # the cached rows are L2-normalised float32 embeddings


@dataclass
class Cached:
    """A cache read back and checked: file stamp -> row, the rows, stamp -> reason of unreadable files, and why a
    cache file that was there is not used (None: it is used, or there was none, or it was made for another key)."""

    rows: dict[tuple, int] = field(default_factory=dict)
    embeddings: Tensor | None = None
    bad: dict[tuple, str] = field(default_factory=dict)
    problem: str | None = None


def digest(meta: dict, emb: Tensor) -> str:
    """sha256 over the index (all but its own `sha256` entry, as canonical JSON) and the float32 rows: a flipped bit
    in either is found on read."""
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8"))
    h.update(emb.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, key: str) -> Cached:
    """The cache at `path` if it is whole and was made for `key`; else an empty one, with the reason when the file
    was there but damaged (another key is not damage: the run or its encoder changed and the cache is stale)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.exists():
        return Cached()
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            emb = f.get_tensor("embeddings") if "embeddings" in f.keys() else None
    except (OSError, ValueError, SafetensorError) as e:
        return Cached(problem=f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    index = metadata.get("index") if isinstance(metadata, dict) else None
    try:
        meta = json.loads(index) if isinstance(index, str) else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return Cached(problem="no index in its metadata")
    if meta.get("key") != key:
        return Cached()
    problem = _check(meta, emb)
    if problem:
        return Cached(problem=problem)
    rows = {tuple(f): i for i, f in enumerate(meta["files"])}
    return Cached(rows, emb, {tuple(s[:3]): s[3] for s in meta["skipped"]})


def _check(meta: dict, emb: Tensor | None) -> str | None:
    """Why a cache made for this key cannot be used, or None."""
    stamp = (str, int, int)
    files, skipped = meta.get("files"), meta.get("skipped")
    if not isinstance(files, list) or not all(_is(f, stamp) for f in files):
        return "its file list is malformed"
    if not isinstance(skipped, list) or not all(_is(s, (*stamp, str)) for s in skipped):
        return "its list of unreadable files is malformed"
    if emb is None or emb.dtype != torch.float32 or emb.ndim != 2 or emb.shape[0] != len(files) or emb.shape[1] < 1:
        got = f"{emb.dtype} {list(emb.shape)}" if emb is not None else "none"
        return f"embeddings {got} for {len(files)} files (expected float32 [{len(files)}, E])"
    if "sha256" not in meta:
        return "no checksum (written by an older pipe)"
    if meta["sha256"] != digest(meta, emb):
        return "checksum mismatch"
    if not torch.isfinite(emb).all():
        return "non-finite embeddings"
    off = (emb.norm(dim=1) - 1).abs()
    if len(off) and off.max() > NORM_TOL:
        return f"embeddings not of unit norm (row {int(off.argmax())}: norm {emb[int(off.argmax())].norm():.4g})"
    return None


def _is(entry: object, types: tuple[type, ...]) -> bool:
    """`entry` is a JSON list of exactly these types (bools are not ints here)."""
    return (
        isinstance(entry, list)
        and len(entry) == len(types)
        and all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(entry, types))
    )


def folder_embeddings(
    model: AlignedModel,
    folder: Path,
    strict: bool = False,
    use_cache: bool = True,
    on_images: Callable[[int], None] | None = None,
    *,
    discard: str | None = None,
) -> FolderEmbeddings:
    """Embeddings of every readable image under `folder`, from the cache where a file is unchanged. A damaged cache
    is not used (`cache_problem` says why) and is rewritten; `discard` is that reason when the caller found it."""
    paths = list_images(folder)
    stamp = {p: (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in paths}
    key, path = model_key(model), cache_file(model, folder)
    cache = _read(path, key) if use_cache and discard is None else Cached(problem=discard)
    rows, cached, bad = cache.rows, cache.embeddings, cache.bad
    todo = [p for p in paths if stamp[p] not in rows and stamp[p] not in bad]
    if on_images:
        on_images(len(paths) - len(todo))
    emb, kept, skipped = model.encode_files(todo, skip_unreadable=not strict, on_images=on_images)
    if cached is not None and kept and emb.shape[1] != cached.shape[1]:  # right key and checksum, wrong model
        why = f"embeddings of width {cached.shape[1]} where the model gives {emb.shape[1]}"
        return folder_embeddings(model, folder, strict, use_cache, on_images, discard=why)
    new = {todo[i]: emb[j] for j, i in enumerate(kept)}
    reasons = {todo[i]: why for i, why in skipped} | {p: bad[stamp[p]] for p in paths if stamp[p] in bad}
    readable = [p for p in paths if p in new or stamp[p] in rows]
    if not readable:
        raise PipeError(f"{folder}: none of its {len(paths)} images is readable")
    out = torch.stack([new[p] if p in new else cached[rows[stamp[p]]].to(model.device) for p in readable])
    result = FolderEmbeddings(
        readable, out, [(p, reasons[p]) for p in paths if p in reasons], len(todo), cache_problem=cache.problem
    )
    changed = todo or len(rows) + len(bad) != len(paths) or cache.problem
    if use_cache and changed:
        result.cache = _write(
            path,
            key,
            folder,
            out,
            [stamp[p] for p in readable],
            [[*stamp[p], reasons[p]] for p in paths if p in reasons],
        )
    elif use_cache:
        result.cache = path
    return result


def _write(path: Path, key: str, folder: Path, emb: Tensor, files: list, skipped: list) -> Path | None:
    """Atomically replace the cache; a run dir we cannot write to just means no cache (None)."""
    from safetensors.torch import save

    meta = {"key": key, "folder": str(folder.resolve()), "files": files, "skipped": skipped}
    meta["sha256"] = digest(meta, emb)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": emb.detach().float().cpu().contiguous()}
        write_bytes(path, save(tensors, metadata={"index": json.dumps(meta)}))
    except (OSError, PipeError):
        return None
    return path
