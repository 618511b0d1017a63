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
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from .claim import check_parent, claim
from .errors import PipeError
from .integrity import (
    CHECKSUMS,
    READ_ERRORS,
    DamagedStore,
    StrictStore,
    damage_reason,
    has_checksums,
    non_finite_rows,
    row_digests,
)
from .remote import Remote, location

SCHEMA = "pipe.features/1"
CHUNK_BYTES = 4 << 20  # one chunk (the unit of reading) holds about 4 MB of tokens
SHARD_BYTES = 256 << 20  # one shard (the unit of writing) about 256 MB
DTYPES = ("float16", "bfloat16")
FEATURES = ("cls", "patches", "tokens", "pooled")  # the float arrays (NaN fill, checked for finiteness)
LINES_PER_ARRAY = 5  # verify lists at most this many problems of one array, then how many more there are


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
    checksums: str | None = CHECKSUMS  # integrity format (extract/integrity.py); None: a store written before it
    schema: str = SCHEMA
    prompts: str | None = None  # class-prompt stores of a named prompt set other than the standard one ("pal")
    prompt_names: tuple[str, ...] | None = None  # the class names written into its prompts, where not `classes`

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
        d["prompt_names"] = list(self.prompt_names) if self.prompt_names is not None else None
        return d

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StoreLayout:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in attrs.items() if k in names}
        d.setdefault("checksums", None)  # written before checksums existed
        for key in ("grid", "classes", "templates", "prompt_names"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        lay = cls(**d)
        lay.check()
        return lay

    def check(self) -> None:
        """TypeError/ValueError unless the attributes can describe a store (hand-edited or damaged zarr.json)."""
        if self.modality not in ("image", "text") or self.dtype not in DTYPES or not isinstance(self.encoder, dict):
            raise ValueError(f"modality {self.modality!r}, dtype {self.dtype!r} or encoder is not valid")
        sizes = {"count": 0, "tokens": 1, "dim": 1, "rows_per_chunk": 1, "rows_per_shard": 1}
        for key, low in sizes.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{key}={value!r} is not an integer >= {low}")


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


def store_path(features: str | Path | Remote, dataset: str, split: str, encoder_alias: str) -> Path | Remote:
    """`<features>/<dataset>/<split>/<encoder>.zarr` (a folder, or a URL: extract/remote.py); `hf:` aliases become a
    file-system-safe name."""
    safe = encoder_alias.replace("hf:", "hf-").replace("/", "--").replace("\\", "--").strip(".")
    return location(features) / dataset / split / f"{safe}.zarr"


@dataclass
class FeatureStore:
    """An open store: the layout plus its Zarr group. Use `create_store` / `open_store`."""

    path: Path | Remote
    group: zarr.Group
    layout: StoreLayout
    attrs: dict[str, Any] = field(default_factory=dict)
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)

    # -- arrays ---------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> zarr.Array:
        """An array of the store, its shape checked against the layout; a missing or unreadable one, or one of
        another shape, is a one-line DamagedStore (a PipeError) naming the store and the array."""
        arr = self._arrays.get(name)
        if arr is None:
            try:
                arr = self.group[name]
            except KeyError:
                raise DamagedStore(self.path, name, f"{name}/zarr.json is missing") from None
            except READ_ERRORS as e:
                raise DamagedStore(self.path, name, f"{name}/zarr.json cannot be read ({type(e).__name__})") from None
            want = expected_shapes(self.layout).get(name)
            if want is not None and tuple(arr.shape) != want:
                raise DamagedStore(self.path, name, f"shape {tuple(arr.shape)}, expected {want}")
            arr = arr.with_config({"write_empty_chunks": True})  # every chunk on disk: an absent one was lost
            self._arrays[name] = arr
        return arr

    @property
    def token_array(self) -> str:
        return "patches" if self.layout.modality == "image" else "tokens"

    def read(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Rows of one array (a slice, or row indices: a selection of the chunks that hold them) as stored. A chunk
        that fails its checksum, cannot be decoded or is missing is a one-line DamagedStore naming store and array."""
        arr = self[name]
        try:
            if isinstance(rows, slice):
                return arr[rows]
            return arr.get_orthogonal_selection((np.asarray(rows),))
        except READ_ERRORS as e:  # a missing chunk is already a DamagedStore (StrictStore), not one of these
            raise DamagedStore(self.path, name, damage_reason(e)) from None

    def rows(self, name: str, start: int = 0, stop: int | None = None, *, finite: bool = True):
        """Rows of a feature array as a torch tensor in its stored precision (bfloat16 bits decoded). With `finite`,
        a non-finite value in a row that is not skipped is a one-line error naming store, array and row."""
        block = self.read(name, slice(start, stop))
        if finite and name in FEATURES:
            self.check_finite(name, block, start)
        return self.decode(block)

    def check_finite(self, name: str, block: np.ndarray, start: int) -> None:
        """PipeError naming the first row of `block` (rows start.. of feature array `name`, as stored) that holds
        NaN or inf and is not a skipped row (skipped rows are never read as features)."""
        bad = non_finite_rows(block, self.layout.dtype)
        if bad.any():
            bad &= ~self.read("skipped", slice(start, start + len(block))).astype(bool)
            if bad.any():
                row = start + int(np.argmax(bad))
                raise PipeError(f"{self.path}: array {name!r} has non-finite values in row {row} (see `pipe verify`)")

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
            raise PipeError(
                f"{self.path}: store is incomplete (extraction was interrupted?); re-run the same `pipe extract`"
            )

    def to_dask(self, name: str):
        """Lazy dask view with one block per shard (dask would otherwise default to the small inner chunks)."""
        import dask.array as da

        arr = self[name]
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)

    # -- writing --------------------------------------------------------------------------------------------------
    def pending_shards(self) -> list[int]:
        """Shards with at least one row not marked done (read shard by shard: `done` is tiny)."""
        done = self["done"]
        return [s for s in range(self.layout.num_shards) if not done[slice(*self.layout.shard_range(s))].all()]

    def write_shard(self, shard: int, rows: dict[str, np.ndarray], skipped: np.ndarray) -> None:
        """Write one whole shard of every array, then its `done` flags (so a crash never leaves done rows unwritten).
        An array missing from `rows` is written as its fill value (NaN for features, which `pipe verify` reports),
        so every chunk exists; with checksums, the rows' digests are written before `done`."""
        start, stop = self.layout.shard_range(shard)
        values = dict(rows) | {"skipped": np.asarray(skipped, dtype=bool)}
        for name, value in values.items():
            if len(value) != stop - start:
                raise ValueError(f"shard {shard}: {name} has {len(value)} rows, expected {stop - start}")
        names = [n for n in expected_shapes(self.layout) if n not in ("done", "digest")]
        if set(values) - set(names):
            raise ValueError(f"shard {shard}: no arrays {sorted(set(values) - set(names))} in this store")
        for name in names:
            arr = self[name]
            if name not in values:
                values[name] = np.full((stop - start, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
            arr[start:stop] = values[name]
        if self.layout.checksums:
            self["digest"][start:stop] = self._digests(start, values)
        self["done"][start:stop] = True

    def _digests(self, start: int, values: dict[str, np.ndarray]) -> np.ndarray:
        """[rows, arrays] uint32: each row's digest in each array, computed from the values as stored."""
        cols = []
        for name in digest_arrays(self.layout):
            dtype = self[name].dtype
            value = np.asarray(values[name])
            cols.append(row_digests(start, value if dtype.kind in "OTU" else value.astype(dtype, copy=False)))
        return np.stack(cols, axis=1)

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> None:
        """Mark complete after checking every row is done; records the skipped ids."""
        if self.pending_shards():
            raise PipeError(f"{self.path}: cannot mark complete, shards {self.pending_shards()[:5]} are not done")
        skipped_mask = self["skipped"][:]
        ids = self["ids"][:]
        attrs = dict(extra_attrs or {})
        attrs["skipped"] = [str(i) for i in ids[skipped_mask]]
        attrs["complete"] = True
        self.group.attrs.update(attrs)

    # -- checking -------------------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found, one line each (empty when the store is sound). Checks the attributes and the checksum
        format, then every array: present, of the layout's shape, with crc32c in its codecs, every chunk read (and
        so checksummed) shard by shard; in each finished shard the features are finite (skipped rows aside), the
        rows match their digests, and ids, text, labels, item and length hold possible values."""
        lay, problems = self.layout, []
        if self.attrs.get("schema") != SCHEMA:
            problems.append(f"schema is {self.attrs.get('schema')!r}, expected {SCHEMA!r}")
        if lay.checksums is None:
            problems.append(
                "written without checksums (before format crc32c/1): damage to its files cannot be "
                "detected; re-extract it to protect it"
            )
        elif lay.checksums != CHECKSUMS:
            problems.append(f"checksum format {lay.checksums!r} is unknown (expected {CHECKSUMS!r})")
        names = []
        for name in expected_shapes(lay):
            try:
                arr = self[name]
            except DamagedStore as e:
                problems.append(f"array {name!r}: {e.reason}")
                continue
            if lay.checksums and not has_checksums(arr):
                problems.append(f"array {name!r} has no crc32c checksums in its codecs")
            names.append(name)
        if not self.complete:
            problems.append("store is not marked complete")
        counts: dict[str, int] = {}
        not_done, skipped_ids = [], []
        for shard in range(lay.num_shards):
            start, stop = lay.shard_range(shard)
            blocks = {}
            for name in names:
                try:
                    blocks[name] = self.read(name, slice(start, stop))
                except DamagedStore as e:
                    counts[name] = counts.get(name, 0) + 1
                    if counts[name] <= LINES_PER_ARRAY:
                        problems.append(f"array {name!r} rows {start}-{stop - 1} (shard {shard}): {e.reason}")
            done = blocks.get("done")
            if done is not None and not done.all():
                not_done.extend(start + np.flatnonzero(~done))
                continue  # an unfinished shard's content is not checked: it was never (completely) written
            for name, text in self._shard_problems(start, blocks):
                counts[name] = counts.get(name, 0) + 1
                if counts[name] <= LINES_PER_ARRAY:
                    problems.append(text)
            if "ids" in blocks and "skipped" in blocks:
                skipped_ids += [str(i) for i in blocks["ids"][blocks["skipped"].astype(bool)]]
        if not_done:
            problems.append(f"{len(not_done)} rows not done (first: row {not_done[0]})")
        problems += [
            f"array {n!r}: {c - LINES_PER_ARRAY} more problems not listed"
            for n, c in counts.items()
            if c > LINES_PER_ARRAY
        ]
        recorded = self.attrs.get("skipped", [])
        if self.complete and not not_done and "skipped" in names and "ids" in names and recorded != skipped_ids:
            problems.append(
                f"attribute 'skipped' lists {len(recorded)} ids but array 'skipped' marks {len(skipped_ids)} rows"
            )
        return problems

    def _shard_problems(self, start: int, blocks: dict[str, np.ndarray]) -> list[tuple[str, str]]:
        """(array, problem) for the values of one finished shard (rows start..)."""
        lay, out = self.layout, []
        n = len(next(iter(blocks.values()))) if blocks else 0
        where = f"rows {start}-{start + n - 1}"
        skipped = blocks["skipped"].astype(bool) if "skipped" in blocks else np.zeros(n, bool)
        for name in FEATURES:
            if name in blocks:
                bad = non_finite_rows(blocks[name], lay.dtype) & ~skipped
                if bad.any():
                    out.append((name, f"array {name!r} has non-finite values in row {start + int(np.argmax(bad))}"))
        if "digest" in blocks:
            for col, name in enumerate(digest_arrays(lay)):
                if name in blocks:
                    wrong = np.flatnonzero(row_digests(start, blocks[name]) != blocks["digest"][:, col])
                    if len(wrong):
                        out.append(
                            (
                                name,
                                f"array {name!r} {where}: {len(wrong)} rows do not match their recorded "
                                f"digest (first: row {start + wrong[0]}): a shard file moved, swapped or "
                                "replaced?",
                            )
                        )
        limits = {
            "length": (0, lay.tokens),
            "item": (0, len(lay.classes) - 1 if lay.templates else None),
            "labels": (-1, len(lay.classes) - 1 if lay.classes else None),
        }
        for name, (low, high) in limits.items():
            if name in blocks:
                v = blocks[name].astype(np.int64)
                bad = (v < low) | (v > high if high is not None else False)
                if bad.any():
                    r = int(np.argmax(bad))
                    rng = f"[{low}, {high}]" if high is not None else f">= {low}"
                    out.append((name, f"array {name!r} row {start + r}: {v[r]} is not in {rng}"))
        for name in ("ids", "text"):
            if name in blocks:
                empty = np.flatnonzero([not str(x) for x in blocks[name]])
                if len(empty):
                    out.append((name, f"array {name!r} row {start + empty[0]} is empty"))
        return out

    def info(self) -> dict[str, Any]:
        """What `pipe info` prints; a damaged array is shown as such rather than failing the listing."""
        size = store_bytes(self.path)
        arrays: dict[str, Any] = {}
        for name in expected_shapes(self.layout):
            try:
                arrays[name] = list(self[name].shape)
            except DamagedStore as e:
                arrays[name] = f"damaged ({e.reason})"
        try:
            done_rows: Any = int(self.read("done").sum())
        except DamagedStore:
            done_rows = "unreadable (see pipe verify)"
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
            "checksums": self.layout.checksums or "none (written before crc32c/1)",
            "bytes_on_disk": size,
            "done_rows": done_rows,
            "skipped": len(self.attrs.get("skipped", [])),
            "complete": self.complete,
        }


def expected_shapes(lay: StoreLayout) -> dict[str, tuple[int, ...]]:
    n, t, d = lay.count, lay.tokens, lay.dim
    common = {"ids": (n,), "done": (n,), "skipped": (n,)}
    if lay.checksums:
        common["digest"] = (n, len(digest_arrays(lay)))
    if lay.modality == "image":
        return common | {"cls": (n, d), "patches": (n, t, d), "labels": (n,)}
    return common | {"text": (n,), "item": (n,), "tokens": (n, t, d), "length": (n,), "pooled": (n, d)}


def digest_arrays(lay: StoreLayout) -> tuple[str, ...]:
    """The arrays whose rows have a digest, in the order of the `digest` array's columns (`done` is not one: it is
    written after the digests)."""
    if lay.modality == "image":
        return ("ids", "cls", "patches", "labels", "skipped")
    return ("ids", "text", "item", "tokens", "length", "pooled", "skipped")


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
    if lay.checksums:
        specs["digest"] = {
            "shape": (n, len(digest_arrays(lay))),
            "dtype": "uint32",
            "fill_value": 0,
            "chunks": (rs, len(digest_arrays(lay))),
            "shards": None,
        }
    return specs


def create_store(path: str | Path, layout: StoreLayout) -> FeatureStore:
    """Create an empty store, or reopen an unfinished one with the same layout (resume).

    A complete store with the same layout is returned as is (nothing to do); a store written with another layout
    (encoder, dataset, rows, schema) is an error rather than something to overwrite silently. The store's claim
    (extract/claim.py) is held meanwhile: another process creating or writing it is refused, never interleaved.
    """
    path = location(path)
    if isinstance(path, Remote):
        return create_remote(path, layout)
    check_parent(path)
    with claim(path):
        return _create_or_reopen(path, layout)


def _create_or_reopen(path: Path, layout: StoreLayout) -> FeatureStore:
    if (path / "zarr.json").exists():
        return reopen_same(path, layout)
    if path.exists():
        if any(path.iterdir()):
            raise PipeError(f"{path}: exists and is not a feature store")
        path.rmdir()
    tmp = path.with_name(path.name + ".creating")
    if tmp.is_symlink():  # never created through a link planted at the temporary's name
        tmp.unlink()
    elif tmp.exists():  # left by a process that died while creating it (the claim is ours: nobody else writes it)
        shutil.rmtree(tmp)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    create_arrays(group, layout)
    group.attrs.update(layout.to_attrs() | {"count": layout.count, "complete": False, "skipped": []})
    tmp.rename(path)  # a store either exists with all its arrays or not at all
    return open_store(path, require_complete=False)


def create_remote(path: Remote, layout: StoreLayout) -> FeatureStore:
    """Create a store on object storage in place, or reopen (resume) it: there is no rename to make creation atomic,
    so the group's `zarr.json` is written first, with the full layout and `complete: false`, then each array's
    metadata (one object each). A run killed in between leaves a store that is incomplete by its attributes; the
    rerun reopens it and creates the arrays still missing. `complete: true` is written last (`finalize`), after
    every shard with its digests and `done` rows. No claim: see docs/store.md "Remote stores"."""
    if (path / "zarr.json").exists():
        store = reopen_same(path, layout)
        if not store.complete:
            missing = [n for n in _array_specs(layout) if not (path / n / "zarr.json").exists()]
            if missing:
                create_arrays(store.group, layout, missing)
        return store
    if path.is_dir():
        raise PipeError(f"{path}: exists and is not a feature store")
    attrs = layout.to_attrs() | {"count": layout.count, "complete": False, "skipped": []}
    group = zarr.create_group(store=path.zarr_store(), zarr_format=3, attributes=attrs)
    create_arrays(group, layout)
    return open_store(path, require_complete=False)


def reopen_same(path: Path | Remote, layout: StoreLayout) -> FeatureStore:
    """The existing store at `path`, unless it was written with another layout (then a one-line error)."""
    store = open_store(path, require_complete=False)
    old, new = _resumable_attrs(store.layout), _resumable_attrs(layout)
    if old != new:
        diff = sorted(k for k in new if old.get(k) != new.get(k))
        enc_a, enc_b = old.get("encoder") or {}, new.get("encoder") or {}
        sub = [f"encoder {k} {enc_a.get(k)} vs {enc_b.get(k)}" for k in sorted(enc_b) if enc_a.get(k) != enc_b.get(k)]
        what = ", ".join(sub + [k for k in diff if k != "encoder"])
        raise PipeError(f"{path}: existing store differs in {what}; remove it or use another --features")
    return store


def create_arrays(group: zarr.Group, layout: StoreLayout, names: list[str] | None = None) -> None:
    """The layout's arrays (or those of `names`) in `group`, empty."""
    # crc32c last: applied to each (inner) chunk's compressed bytes, checked first on reading; shard indexes carry
    # zarr's default crc32c index codec
    compressors = (ZstdCodec(level=3), Crc32cCodec()) if layout.checksums else (ZstdCodec(level=3),)
    for name, spec in _array_specs(layout).items():
        if names is None or name in names:
            group.create_array(name, compressors=compressors, **spec)


def _resumable_attrs(layout: StoreLayout) -> dict[str, Any]:
    """Layout attributes as resume compares them: a store written before `compute_dtype` was recorded was computed
    in float32 (the only compute dtype then), so that is what its missing entry means."""
    d = layout.to_attrs()
    d["encoder"] = recorded_encoder(d["encoder"], layout.modality)
    return d


def recorded_encoder(encoder: dict[str, Any], modality: str) -> dict[str, Any]:
    """A store's encoder attributes with what a missing entry meant when the store was written: before they were
    recorded, every forward ran in float32, images were cropped as the model's processor says and captions dropped
    their special tokens. So an old store is never taken for one made with today's defaults."""
    image = (encoder.get("modality") or modality) == "image"
    legacy = {
        "compute_dtype": "float32",
        "crop": "processor" if image else None,
        "special_tokens": None if image else "drop",
    }
    return legacy | {k: v for k, v in encoder.items() if v is not None or k not in legacy}


def open_store(
    path: str | Path, *, require_complete: bool = True, modality: str | None = None, encoder: str | None = None
) -> FeatureStore:
    """Open a store, checking the schema version, and optionally completeness, modality and encoder alias.

    A complete store with checksums is read strictly: a chunk file that is absent is an error, not its fill value
    (extract/integrity.py). Stores written before checksums open as before (`pipe verify` says what they lack)."""
    path = location(path)
    if not (path / "zarr.json").exists():
        raise PipeError(f"{path}: no feature store here")
    backing = StrictStore(path.zarr_store() if isinstance(path, Remote) else LocalStore(path))
    try:
        group = zarr.open_group(store=backing, mode="r+", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any read failure is the same problem to the user
        raise PipeError(f"{path}: cannot open as a Zarr v3 group ({type(e).__name__}: {e})") from None
    attrs = dict(group.attrs)
    if attrs.get("schema") != SCHEMA:
        raise PipeError(f"{path}: schema {attrs.get('schema')!r} is not {SCHEMA!r} (written by another version?)")
    try:
        layout = StoreLayout.from_attrs(attrs)
    except (TypeError, ValueError) as e:
        raise PipeError(f"{path}: attributes do not describe a {SCHEMA} store ({e})") from None
    backing.strict = attrs.get("complete") is True and layout.checksums is not None
    store = FeatureStore(path=path, group=group, layout=layout, attrs=attrs)
    if require_complete:
        store.require_complete()
    if modality and layout.modality != modality:
        raise PipeError(f"{path}: is a {layout.modality} store, expected {modality}")
    if encoder and layout.encoder.get("alias") != encoder:
        raise PipeError(f"{path}: was written by encoder {layout.encoder.get('alias')!r}, not {encoder!r}")
    return store


def origin_difference(
    a: dict | None, b: dict | None, keys: tuple[str, ...] = ("root", "options", "limit")
) -> str | None:
    """How two origins (dataset root, -o options, --limit, as a store records them) differ in `keys`, or None when
    they are the same data. Roots compare as resolved paths; option values as text (`-o k=3` and `-o k="3"` agree)."""
    if a is None or b is None:  # stores written before origins were recorded
        return None
    ra, rb = a.get("root"), b.get("root")
    if "root" in keys and (ra is None) != (rb is None) or (ra is not None and Path(ra).resolve() != Path(rb).resolve()):
        return f"--root {ra} vs {rb}"
    oa = {k: str(v) for k, v in (a.get("options") or {}).items()}
    ob = {k: str(v) for k, v in (b.get("options") or {}).items()}
    if "options" in keys and oa != ob:
        fmt = lambda o: " ".join(f"-o {k}={v}" for k, v in sorted(o.items())) or "no -o options"  # noqa: E731
        return f"{fmt(oa)} vs {fmt(ob)}"
    if "limit" in keys and a.get("limit") != b.get("limit"):
        return f"--limit {a.get('limit')} vs {b.get('limit')}"
    return None


def read_json_attrs(path: str | Path | Remote) -> dict[str, Any]:
    """Group attributes straight from zarr.json (cheap, no zarr machinery): for listings."""
    return json.loads((location(path) / "zarr.json").read_text()).get("attributes", {})


def store_bytes(path: Path | Remote) -> int:
    """Bytes the store's files (or objects) take."""
    if isinstance(path, Remote):
        return path.du()
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
