"""Paired training data from the feature stores: which stores, which rows, and batches for an epoch.

`find_pair_stores` picks the image store and the caption store of one dataset split; `PairSource` serves image rows
with one caption each (a different caption per epoch, seeded). When the rows fit the memory budget they are loaded
once (onto the training device) and every epoch indexes them there; otherwise each epoch streams shard-aligned
blocks from Zarr through a bounded prefetch queue that reads the next block while the current one trains.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipe_align.extract.errors import PipeError
from pipe_align.extract.remote import Remote, location
from pipe_align.extract.runtime import prefetch
from pipe_align.extract.store import FeatureStore, open_store, origin_difference, recorded_encoder

from .base import ImageRows, TextRows

REMOTE_AHEAD = 2  # streamed blocks read ahead of training from object storage (one from a local disk)


@dataclass
class PairStores:
    image: FeatureStore
    text: FeatureStore


def stores_in(folder: str | Path | Remote) -> list[FeatureStore]:
    folder = location(folder)
    if not folder.is_dir():
        raise PipeError(f"--shards {folder}: no such folder")
    paths = sorted(p for p in folder.glob("*.zarr") if not p.name.endswith((".prompts.zarr", ".phrases.zarr")))
    return [open_store(p, require_complete=False) for p in paths]


def find_pair_stores(
    shards: str | Path, image_encoder: str | None = None, text_encoder: str | None = None
) -> PairStores:
    """The image store and caption store in `shards` (one dataset split); an encoder option picks among several."""
    folder = location(shards)
    stores = stores_in(folder)
    picked = {}
    for modality, want, opt in (("image", image_encoder, "--image-encoder"), ("text", text_encoder, "--text-encoder")):
        cands = [s for s in stores if s.layout.modality == modality]
        if want is not None:
            cands = [s for s in cands if s.layout.encoder.get("alias") == want or s.path.stem == want]
        names = ", ".join(s.layout.encoder.get("alias") for s in stores if s.layout.modality == modality) or "none"
        if not cands:
            raise PipeError(
                f"--shards {folder}: no {modality} store"
                + (f" for {opt} {want}" if want else "")
                + f" (found: {names})"
            )
        if len(cands) > 1:
            raise PipeError(f"--shards {folder}: several {modality} stores ({names}); choose one with {opt}")
        picked[modality] = cands[0]
    image, text = picked["image"], picked["text"]
    image.require_complete()
    text.require_complete()
    if (image.layout.dataset, image.layout.split) != (text.layout.dataset, text.layout.split):
        raise PipeError(
            f"{image.path} is {image.layout.dataset}/{image.layout.split} but {text.path} is "
            f"{text.layout.dataset}/{text.layout.split}: stores of one dataset split are needed"
        )
    if text.layout.templates is not None:
        raise PipeError(f"{text.path}: holds class prompts, not captions; pairs need a caption store")
    differs = origin_difference(image.layout.origin, text.layout.origin)
    if differs:
        raise PipeError(
            f"{image.path} and {text.path} were extracted from different data ({differs}): the caption "
            "rows would not describe the image rows; extract both with the same --root, -o and --limit"
        )
    return PairStores(image, text)


def heldout_stores(folder: str | Path, train: PairStores) -> PairStores:
    """The image and caption stores of another store set (`--val-shards`, e.g. COCO val2014 beside train2014) whose
    pairs are held out: written by the same encoders with the same recorded choices (layer, crop, special tokens,
    precision, ...) as the training stores, since the held-out loss compares the two."""
    held = find_pair_stores(folder, train.image.layout.encoder.get("alias"), train.text.layout.encoder.get("alias"))
    for mine, theirs in ((train.image, held.image), (train.text, held.text)):
        if mine.path.resolve() == theirs.path.resolve():
            raise PipeError(f"--val-shards {folder}: holds the training stores themselves; name another split's folder")
        a = recorded_encoder(mine.layout.encoder, mine.layout.modality)
        b = recorded_encoder(theirs.layout.encoder, theirs.layout.modality)
        same = ("model_id", "image_size", "max_length")  # where the files are, the input size, the padding length
        keys = sorted(k for k in a.keys() | b.keys() if k not in same and a.get(k) != b.get(k))
        if mine.layout.dtype != theirs.layout.dtype:
            keys.append("dtype")
            a, b = a | {"dtype": mine.layout.dtype}, b | {"dtype": theirs.layout.dtype}
        if keys:
            k = keys[0]
            raise PipeError(
                f"--val-shards {folder}: {theirs.path.name} has encoder {k}={b.get(k)!r} but the training "
                f"store {mine.path} has {k}={a.get(k)!r}; extract both with the same settings"
            )
    return held


def store_fingerprint(st: FeatureStore) -> str:
    """Identifies the data a run trained on: layout attributes plus the stored ids (cheap, content-addressed)."""
    h = hashlib.sha256(json.dumps(st.layout.to_attrs(), sort_keys=True).encode())
    h.update("\n".join(map(str, st["ids"][:])).encode())
    return h.hexdigest()[:16]


@dataclass
class Split:
    """Image rows (of the image store) for training and for validation, and each image's caption rows."""

    train: np.ndarray
    val: np.ndarray
    captions: list[np.ndarray]  # per image row: text-store rows of its captions


def pair_split(stores: PairStores, val_fraction: float, seed: int, limit: int | None = None) -> Split:
    """Images that have a caption and were not skipped, split into train / val by a seeded permutation."""
    item = stores.text["item"][:]
    n_img = stores.image.layout.count
    if len(item) and (item.min() < 0 or item.max() >= n_img):
        bad = int(np.flatnonzero((item < 0) | (item >= n_img))[0])
        raise PipeError(f"{stores.text.path}: caption row {bad} links to image {item[bad]}, outside 0..{n_img - 1}")
    order = np.argsort(item, kind="stable")
    bounds = np.searchsorted(item[order], np.arange(n_img + 1))
    captions = [order[bounds[i] : bounds[i + 1]] for i in range(n_img)]
    skipped = stores.image["skipped"][:]
    rows = np.array([i for i in range(n_img) if len(captions[i]) and not skipped[i]], dtype=np.int64)
    if limit is not None:
        rows = rows[:limit]
    if len(rows) < 2:
        raise PipeError(f"{stores.image.path} + {stores.text.path}: {len(rows)} image-caption pairs; need at least 2")
    perm = np.random.default_rng(seed).permutation(rows)
    n_val = int(round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    n_val = min(n_val, len(rows) - 2)
    return Split(train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val]), captions=captions)


@dataclass
class Batch:
    image: ImageRows
    text: TextRows
    rows: np.ndarray  # image rows in this batch (this rank's part of it under data parallelism)
    sizes: tuple[int, ...] | None = None  # rows of every rank's part, in rank order (data parallelism)
    offset: int = 0  # where this rank's part starts in the whole batch (data parallelism)

    @property
    def total(self) -> int:
        """Pairs in the whole batch, over all ranks."""
        return sum(self.sizes) if self.sizes is not None else len(self.rows)


def part_bounds(n: int, part: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...] | None]:
    """This rank's slice [lo, hi) of a batch of n rows and every rank's size (the first n % world ranks get one
    more), so that the ranks' parts, in rank order, are the batch a single process would train on."""
    if part is None:
        return 0, n, None
    rank, world = part
    sizes = tuple(n // world + (r < n % world) for r in range(world))
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank], sizes


class PairSource:
    """Serves batches of (image, one caption) for the given image rows, from memory or streamed from the stores."""

    def __init__(
        self,
        stores: PairStores,
        rows: np.ndarray,
        captions: list[np.ndarray],
        *,
        tokens: bool,
        device: str = "cpu",
        memory_budget: int | None = None,
        block_rows: int | None = None,
        caption_rule: str = "draw",
    ) -> None:
        self.stores, self.rows, self.captions = stores, np.asarray(rows), captions
        self.caption_rule = caption_rule  # "draw" or "first" (align.loop.CAPTION_RULES)
        self.tokens, self.device = tokens, device
        lay_i, lay_t = stores.image.layout, stores.text.layout
        img_bytes = ((lay_i.tokens if tokens else 0) + 1) * lay_i.dim * 2
        txt_bytes = ((lay_t.tokens if tokens else 0) + 1) * lay_t.dim * 2
        n_caps = sum(len(self.served(r)) for r in self.rows)  # in memory, every caption an epoch may pick is held
        self.bytes_needed = img_bytes * len(self.rows) + txt_bytes * n_caps
        if memory_budget is None:
            memory_budget = default_memory_budget(device)
        self.in_memory = self.bytes_needed <= memory_budget
        self.block_rows = block_rows or max(lay_i.rows_per_shard, 1)
        self._cache: tuple[ImageRows, TextRows, np.ndarray] | None = None
        self._checked: set[tuple] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def served(self, row: int) -> np.ndarray:
        """The caption rows of an image that an epoch may pick: all of them, or under "first" its first one."""
        return self.captions[row][:1] if self.caption_rule == "first" else self.captions[row]

    # -- reading ----------------------------------------------------------------------------------------------------
    def _take(self, store: FeatureStore, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows of one array in the given order: one contiguous read when the rows are dense (a streamed block is a run
        of whole shards, read without any extra copy), else a selection of the chunks that hold them; from object
        storage, always the whole shards that hold them."""
        rows = np.asarray(rows)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if isinstance(store.path, Remote):  # object storage: whole shards, one GET each (never ranged inner chunks)
            uniq, inv = np.unique(rows, return_inverse=True)
            t, first = store.decode(_from_whole_shards(store, name, uniq))[torch.from_numpy(inv)], rows
        elif hi - lo == len(rows) and (np.diff(rows) == 1).all():  # sorted, unique, contiguous
            t = store.decode(store.read(name, slice(lo, hi)))
            first = rows
        else:
            uniq, inv = np.unique(rows, return_inverse=True)
            block = store.read(name, slice(lo, hi))[uniq - lo] if hi - lo <= 2 * len(uniq) else store.read(name, uniq)
            t, first = store.decode(block)[torch.from_numpy(inv)], rows
        key = (id(store), name, lo, hi)
        if t.is_floating_point() and key not in self._checked and not torch.isfinite(t).all():
            bad = int(first[int(torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(1))[0])])
            raise PipeError(f"{store.path}: array {name!r} has non-finite values in row {bad} (see `pipe verify`)")
        self._checked.add(key)  # streamed blocks recur every epoch: check each once
        return t.to(self.device, non_blocking=True)

    def _read_images(self, rows: np.ndarray) -> ImageRows:
        si = self.stores.image
        patches = self._take(si, "patches", rows) if self.tokens else None
        return ImageRows(cls=self._take(si, "cls", rows), patches=patches)

    def _read_texts(self, rows: np.ndarray) -> TextRows:
        st = self.stores.text
        txt = TextRows(pooled=self._take(st, "pooled", rows))
        if self.tokens:
            txt.tokens = self._take(st, "tokens", rows)
            txt.length = self._take(st, "length", rows).long()
        return txt

    def choose_captions(self, rows: np.ndarray, epoch: int, seed: int) -> np.ndarray:
        """One caption per image: a different draw each epoch (deterministic in seed and epoch), or under the rule
        "first" the image's first caption row (the first of its captions in the dataset's file) in every epoch."""
        if self.caption_rule == "first":
            return np.array([self.captions[r][0] for r in rows], dtype=np.int64)
        rng = np.random.default_rng([seed, epoch, 7])
        picks = rng.integers(0, 1 << 30, size=len(rows))
        return np.array([self.captions[r][p % len(self.captions[r])] for r, p in zip(rows, picks)], dtype=np.int64)

    def batch_of(self, positions: np.ndarray, epoch: int, seed: int, part: tuple[int, int] | None = None) -> Batch:
        """The pairs at `positions` (indices into this source's rows, any order) as one batch, each image with the
        caption its rule gives in `epoch`: the LR finder's random draws (align.loop.finder_draws)."""
        positions = np.asarray(positions)
        lo, hi, sizes = part_bounds(len(positions), part)
        pos = positions[lo:hi]
        rows = self.rows[pos]
        caps = self.choose_captions(rows, epoch, seed)
        if not self.in_memory:
            return Batch(self._read_images(rows), self._read_texts(caps), rows, sizes, lo)
        img, txt, all_caps = self._memory()
        if getattr(self, "_cap_pos", None) is None:
            self._cap_pos = {int(c): i for i, c in enumerate(all_caps)}
        ii = torch.as_tensor(pos, device=img.cls.device)
        ti = torch.as_tensor([self._cap_pos[int(c)] for c in caps], device=img.cls.device)
        return Batch(_index_img(img, ii), _index_txt(txt, ti), rows, sizes, lo)

    # -- serving ----------------------------------------------------------------------------------------------------
    def _memory(self) -> tuple[ImageRows, TextRows, np.ndarray]:
        """Every row once, with all captions of each image (so any epoch's draw is an index, not a read)."""
        if self._cache is None:
            all_caps = np.concatenate([self.served(r) for r in self.rows])
            self._cache = (self._read_images(self.rows), self._read_texts(all_caps), all_caps)
        return self._cache

    def batches(
        self, epoch: int, batch_size: int, seed: int, shuffle: bool = True, part: tuple[int, int] | None = None
    ) -> Iterator[Batch]:
        """Batches of an epoch; with `part=(rank, world)` each batch holds only this rank's slice of the batch (every
        rank walks the same seeded order, so the parts together are exactly the single-process batch)."""
        rng = np.random.default_rng([seed, epoch])
        if self.in_memory:
            img, txt, all_caps = self._memory()
            cap_pos = {int(c): i for i, c in enumerate(all_caps)}
            order = rng.permutation(len(self.rows)) if shuffle else np.arange(len(self.rows))
            chosen = self.choose_captions(self.rows, epoch, seed)
            for b0 in range(0, len(order), batch_size):
                whole = order[b0 : b0 + batch_size]
                lo, hi, sizes = part_bounds(len(whole), part)
                idx = whole[lo:hi]
                ti = torch.as_tensor([cap_pos[int(c)] for c in chosen[idx]], device=img.cls.device)
                ii = torch.as_tensor(idx, device=img.cls.device)
                yield Batch(_index_img(img, ii), _index_txt(txt, ti), self.rows[idx], sizes, lo)
            return
        yield from self._stream(epoch, batch_size, seed, rng, shuffle, part)

    def _stream(self, epoch, batch_size, seed, rng, shuffle, part=None) -> Iterator[Batch]:
        """Blocks of whole image shards in shuffled order, shuffled within the block; the next block is read while
        the current one trains (a queue of one; of REMOTE_AHEAD from object storage, where a read waits on the
        network)."""
        shard_of = self.rows // self.stores.image.layout.rows_per_shard
        shards = np.unique(shard_of)
        if shuffle:
            shards = rng.permutation(shards)
        blocks, cur = [], []
        for s in shards:
            cur.append(self.rows[shard_of == s])
            if sum(map(len, cur)) >= max(self.block_rows, batch_size):
                blocks.append(np.sort(np.concatenate(cur)))
                cur = []
        if cur:
            blocks.append(np.sort(np.concatenate(cur)))
        chosen_all = dict(zip(self.rows.tolist(), self.choose_captions(self.rows, epoch, seed)))

        def read_blocks() -> Iterator:
            for rows in blocks:
                caps = np.array([chosen_all[int(r)] for r in rows])
                yield rows, (self._read_images(rows), self._read_texts(caps))

        remote = isinstance(self.stores.image.path, Remote) or isinstance(self.stores.text.path, Remote)
        for rows, (img, txt) in prefetch(read_blocks(), depth=REMOTE_AHEAD if remote else 1):
            order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
            for b0 in range(0, len(order), batch_size):
                whole = order[b0 : b0 + batch_size]
                lo, hi, sizes = part_bounds(len(whole), part)
                sel = whole[lo:hi]
                ii = torch.as_tensor(sel, device=img.cls.device)
                yield Batch(_index_img(img, ii), _index_txt(txt, ii), rows[sel], sizes, lo)


def _from_whole_shards(store: FeatureStore, name: str, rows: np.ndarray) -> np.ndarray:
    """Sorted unique `rows` of one array, read as the whole shards that hold them (each shard one object)."""
    lay = store.layout
    parts = []
    for shard in np.unique(rows // lay.rows_per_shard):
        a, b = lay.shard_range(int(shard))
        parts.append(store.read(name, slice(a, b))[rows[(rows >= a) & (rows < b)] - a])
    return np.concatenate(parts)


def _index_img(img: ImageRows, idx: torch.Tensor) -> ImageRows:
    return ImageRows(cls=img.cls[idx], patches=None if img.patches is None else img.patches[idx])


def _index_txt(txt: TextRows, idx: torch.Tensor) -> TextRows:
    return TextRows(
        pooled=txt.pooled[idx],
        tokens=None if txt.tokens is None else txt.tokens[idx],
        length=None if txt.length is None else txt.length[idx],
    )


def keep_freed_host_memory() -> bool:
    """Serve large host allocations from the heap and keep freed memory for reuse (glibc `mallopt`); True if applied.

    Every streamed block and every batch allocates tens to hundreds of MB. Above glibc's mmap threshold (at most 32 MB
    by default) each such allocation is a fresh mapping whose pages are faulted in and zeroed by the kernel, then
    unmapped on free: on a 2-core CPU that system time was a third of the cost of reading a block. Raising the mmap
    threshold to 1 GiB and the trim threshold to 2 GiB lets the process reuse its freed blocks instead (the same fix
    that a caching allocator such as jemalloc or tcmalloc gives). The price: up to 2 GiB of freed memory stays
    with the process. No-op off glibc, when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set in the
    environment (the user's choice wins), or with PIPE_KEEP_FREED_MEMORY=0.
    """
    import ctypes
    import os
    import sys

    if os.environ.get("PIPE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))


def default_memory_budget(device: str) -> int:
    """Half the free memory of the device (CUDA) or of the host: what `--memory-budget` defaults to."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free // 2
    try:
        import os

        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages // 2
    except (ValueError, OSError):
        return 4 << 30
