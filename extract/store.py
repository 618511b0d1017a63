"""The feature store: one Zarr v3 group per (dataset, split, encoder), schema `pipe.features/1`.

Rows are the unit of meaning (row i of the image store is image i of the dataset), shards the unit of
writing: every array shares one row partition into shards, a writer owns whole shards, and `done` marks
finished rows so a killed run resumes by skipping finished shards. `complete` is the last thing written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipe_align.extract.errors import PipeError

SCHEMA = "pipe.features/1"
CHUNK_BYTES = 4 << 20  # one chunk (the unit of reading) holds about 4 MB of tokens
SHARD_BYTES = 256 << 20  # one shard (the unit of writing) about 256 MB
DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class StoreLayout:
    """Everything that fixes a store's shapes and meaning; persisted in the group attributes."""

    modality: str  # "image" | "text"
    encoder: dict[str, Any]  # EncoderInfo as a dict (alias, model_id, revision, dim, layer, ...)
    dataset: str
    split: str
    count: int  # rows
    tokens: int  # P patches per image, or L padded word tokens per caption
    dim: int
    rows_per_chunk: int
    rows_per_shard: int
    dtype: str = "float16"
    grid: tuple[int, int] | None = None  # image stores
    resize: str | None = None  # image stores: "crop" or "squash"
    classes: tuple[str, ...] | None = None  # labelled image sets and class-prompt text stores
    templates: tuple[str, ...] | None = None  # class-prompt text stores
    origin: dict[str, Any] | None = None  # dataset root, options and --limit: a store is resumed only from the same
    schema: str = SCHEMA

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.count / self.rows_per_shard))

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.count)

    def to_attrs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid) if self.grid else None
        d["classes"] = list(self.classes) if self.classes is not None else None
        d["templates"] = list(self.templates) if self.templates is not None else None
        return d

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StoreLayout:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in attrs.items() if k in names}
        for key in ("grid", "classes", "templates"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def default_rows(tokens: int, dim: int, count: int, shard_rows: int | None = None) -> tuple[int, int]:
    """Rows per chunk (about CHUNK_BYTES) and rows per shard (about SHARD_BYTES, a multiple of the chunk rows)."""
    row_bytes = max(1, tokens * dim * 2)
    per_chunk = max(1, min(CHUNK_BYTES // row_bytes, max(count, 1)))
    if shard_rows is not None:
        if shard_rows < 1:
            raise PipeError(f"--shard-rows must be >= 1, got {shard_rows}")
        per_chunk = min(per_chunk, shard_rows)
        while shard_rows % per_chunk:  # the chunk must tile the shard
            per_chunk -= 1
        return per_chunk, shard_rows
    per_shard = per_chunk * max(1, SHARD_BYTES // (per_chunk * row_bytes))
    per_shard = min(per_shard, per_chunk * math.ceil(max(count, 1) / per_chunk))
    return per_chunk, per_shard


def store_path(features: str | Path, dataset: str, split: str, encoder_alias: str) -> Path:
    """`<features>/<dataset>/<split>/<encoder>.zarr`; `hf:` aliases become a file-system-safe name."""
    safe = encoder_alias.replace("hf:", "hf-").replace("/", "--").replace("\\", "--").strip(".")
    return Path(features) / dataset / split / f"{safe}.zarr"


@dataclass
class FeatureStore:
    """An open store: the layout plus its Zarr group. Use `create_store` / `open_store`."""

    path: Path
    group: zarr.Group
    layout: StoreLayout
    attrs: dict[str, Any] = field(default_factory=dict)

    # -- arrays ---------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> zarr.Array:
        return self.group[name]

    @property
    def token_array(self) -> str:
        return "patches" if self.layout.modality == "image" else "tokens"

    def rows(self, name: str, start: int = 0, stop: int | None = None):
        """Rows of a feature array as a torch tensor in its stored precision (bfloat16 bits decoded)."""
        return self.decode(self.group[name][start:stop])

    def decode(self, block: np.ndarray):
        """A block read from this store as a torch tensor; bfloat16 stores keep their values as uint16 bits."""
        import torch

        if self.layout.dtype == "bfloat16" and block.dtype == np.uint16:
            return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(block))

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def require_complete(self) -> None:
        """One-line error unless every shard was written and the store was finalized."""
        if not self.complete:
            raise PipeError(f"{self.path}: store is incomplete (extraction was interrupted?); re-run the same "
                            "`pipe extract`")  # fmt: skip

    def to_dask(self, name: str):
        """Lazy dask view with one block per shard (dask would otherwise default to the small inner chunks)."""
        import dask.array as da

        arr = self.group[name]
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)

    # -- writing --------------------------------------------------------------------------------------------------
    def pending_shards(self) -> list[int]:
        """Shards with at least one row not marked done (read shard by shard: `done` is tiny)."""
        done = self.group["done"]
        return [s for s in range(self.layout.num_shards) if not done[slice(*self.layout.shard_range(s))].all()]

    def write_shard(self, shard: int, rows: dict[str, np.ndarray], skipped: np.ndarray) -> None:
        """Write one whole shard of every array, then its `done` flags (so a crash never leaves done rows unwritten)."""
        start, stop = self.layout.shard_range(shard)
        for name, value in rows.items():
            if len(value) != stop - start:
                raise ValueError(f"shard {shard}: {name} has {len(value)} rows, expected {stop - start}")
            self.group[name][start:stop] = value
        self.group["skipped"][start:stop] = skipped
        self.group["done"][start:stop] = True

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> None:
        """Mark complete after checking every row is done; records the skipped ids."""
        if self.pending_shards():
            raise PipeError(f"{self.path}: cannot mark complete, shards {self.pending_shards()[:5]} are not done")
        skipped_mask = self.group["skipped"][:]
        ids = self.group["ids"][:]
        attrs = dict(extra_attrs or {})
        attrs["skipped"] = [str(i) for i in ids[skipped_mask]]
        attrs["complete"] = True
        self.group.attrs.update(attrs)

    # -- checking -------------------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found (empty when the store is sound): shapes, done flags, finiteness, attributes."""
        problems = []
        lay = self.layout
        if self.attrs.get("schema") != SCHEMA:
            problems.append(f"schema is {self.attrs.get('schema')!r}, expected {SCHEMA!r}")
        for name, shape in expected_shapes(lay).items():
            if name not in self.group:
                problems.append(f"array {name!r} is missing")
            elif tuple(self.group[name].shape) != shape:
                problems.append(f"array {name!r} has shape {tuple(self.group[name].shape)}, expected {shape}")
        if problems:
            return problems
        if not self.complete:
            problems.append("store is not marked complete")
        not_done = np.flatnonzero(~self.group["done"][:])
        if len(not_done):
            problems.append(f"{len(not_done)} rows not done (first: row {not_done[0]})")
        skipped = self.group["skipped"][:]
        float_arrays = ["cls", "patches"] if lay.modality == "image" else ["tokens", "pooled"]
        for name in float_arrays:
            arr = self.group[name]
            step = lay.rows_per_shard
            for start in range(0, lay.count, step):
                block = self.decode(arr[start : start + step]).float().numpy()  # bfloat16 bits decoded first
                bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1) & ~skipped[start : start + step]
                if bad.any():
                    problems.append(f"array {name!r} has non-finite values in row {start + int(np.argmax(bad))}")
                    break
        if lay.modality == "text":
            length = self.group["length"][:]
            if (length < 0).any() or (length > lay.tokens).any():
                problems.append(f"'length' outside [0, {lay.tokens}]")
        return problems

    def info(self) -> dict[str, Any]:
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.exists() else 0
        arrays = {name: list(arr.shape) for name, arr in self.group.arrays()}
        return {
            "path": str(self.path),
            "schema": self.attrs.get("schema"),
            "modality": self.layout.modality,
            "dataset": f"{self.layout.dataset}/{self.layout.split}",
            "encoder": self.layout.encoder.get("alias"),
            "weights": self.layout.encoder.get("weights"),
            "layer": self.layout.encoder.get("layer"),
            "rows": self.layout.count,
            "dtype": self.layout.dtype,
            "arrays": arrays,
            "rows_per_chunk": self.layout.rows_per_chunk,
            "rows_per_shard": self.layout.rows_per_shard,
            "shards": self.layout.num_shards,
            "bytes_on_disk": size,
            "done_rows": int(self.group["done"][:].sum()),
            "skipped": len(self.attrs.get("skipped", [])),
            "complete": self.complete,
        }


def expected_shapes(lay: StoreLayout) -> dict[str, tuple[int, ...]]:
    n, t, d = lay.count, lay.tokens, lay.dim
    common = {"ids": (n,), "done": (n,), "skipped": (n,)}
    if lay.modality == "image":
        return common | {"cls": (n, d), "patches": (n, t, d), "labels": (n,)}
    return common | {"text": (n,), "item": (n,), "tokens": (n, t, d), "length": (n,), "pooled": (n, d)}


def _zarr_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise PipeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # Zarr v3 has no bfloat16 data type in the core spec: bfloat16 rows are stored as their raw uint16 bits.
    return "float16" if dtype == "float16" else "uint16"


def _array_specs(lay: StoreLayout) -> dict[str, dict[str, Any]]:
    """dtype, chunks, shards and fill for each array. Token arrays are sharded; 1-D arrays use one chunk per shard
    (so a writer of a shard also owns those chunks exclusively)."""
    n, t, d = lay.count, lay.tokens, lay.dim
    rc, rs = lay.rows_per_chunk, lay.rows_per_shard
    feat = _zarr_dtype(lay.dtype)
    nan = np.nan if feat == "float16" else 0x7FC0  # NaN in bfloat16 bits: a missing chunk never reads as a number
    row1 = {"chunks": (rs,), "shards": None}
    specs = {
        "ids": {"shape": (n,), "dtype": str, "fill_value": "", **row1},
        "done": {"shape": (n,), "dtype": "bool", "fill_value": False, **row1},
        "skipped": {"shape": (n,), "dtype": "bool", "fill_value": False, **row1},
    }
    tok = {"shape": (n, t, d), "dtype": feat, "fill_value": nan, "chunks": (rc, t, d), "shards": (rs, t, d)}
    vec = {"shape": (n, d), "dtype": feat, "fill_value": nan, "chunks": (rs, d), "shards": None}
    if lay.modality == "image":
        specs |= {"cls": vec, "patches": tok, "labels": {"shape": (n,), "dtype": "int32", "fill_value": -1, **row1}}
    else:
        specs |= {
            "text": {"shape": (n,), "dtype": str, "fill_value": "", **row1},
            "item": {"shape": (n,), "dtype": "int64", "fill_value": -1, **row1},
            "tokens": tok,
            "length": {"shape": (n,), "dtype": "int16", "fill_value": 0, **row1},
            "pooled": vec,
        }
    return specs


def create_store(path: str | Path, layout: StoreLayout) -> FeatureStore:
    """Create an empty store, or reopen an unfinished one with the same layout (resume).

    A complete store with the same layout is returned as is (nothing to do); a store written with another layout
    (encoder, dataset, rows, schema) is an error rather than something to overwrite silently.
    """
    path = Path(path)
    _check_parent(path)
    if (path / "zarr.json").exists():
        store = open_store(path, require_complete=False)
        old, new = store.layout.to_attrs(), layout.to_attrs()
        if old != new:
            diff = sorted(k for k in new if old.get(k) != new.get(k))
            raise PipeError(f"{path}: existing store differs in {', '.join(diff)}; remove it or use another --features")
        return store
    if path.exists():
        if any(path.iterdir()):
            raise PipeError(f"{path}: exists and is not a feature store")
        path.rmdir()
    tmp = path.with_name(path.name + ".creating")
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name, spec in _array_specs(layout).items():
        group.create_array(name, compressors=ZstdCodec(level=3), **spec)
    group.attrs.update(layout.to_attrs() | {"count": layout.count, "complete": False, "skipped": []})
    tmp.rename(path)  # a store either exists with all its arrays or not at all
    return open_store(path, require_complete=False)


def _check_parent(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise PipeError(f"{parent}: is a file, not a folder (check --features)")
            return


def open_store(
    path: str | Path, *, require_complete: bool = True, modality: str | None = None, encoder: str | None = None
) -> FeatureStore:
    """Open a store, checking the schema version, and optionally completeness, modality and encoder alias."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise PipeError(f"{path}: no feature store here")
    try:
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any read failure is the same problem to the user
        raise PipeError(f"{path}: cannot open as a Zarr v3 group ({type(e).__name__}: {e})") from None
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA:
        raise PipeError(f"{path}: schema {attrs.get('schema')!r} is not {SCHEMA!r} (written by another version?)")
    try:
        layout = StoreLayout.from_attrs(attrs)
    except TypeError as e:
        raise PipeError(f"{path}: attributes do not describe a {SCHEMA} store ({e})") from None
    store = FeatureStore(path=path, group=group, layout=layout, attrs=attrs)
    if require_complete:
        store.require_complete()
    if modality and layout.modality != modality:
        raise PipeError(f"{path}: is a {layout.modality} store, expected {modality}")
    if encoder and layout.encoder.get("alias") != encoder:
        raise PipeError(f"{path}: was written by encoder {layout.encoder.get('alias')!r}, not {encoder!r}")
    return store


def read_json_attrs(path: str | Path) -> dict[str, Any]:
    """Group attributes straight from zarr.json (cheap, no zarr machinery): for listings."""
    with open(Path(path) / "zarr.json") as f:
        return json.load(f).get("attributes", {})
