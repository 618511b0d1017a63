"""The extraction runner: dataset rows -> frozen encoder -> feature store, shard by shard.

Reader -> mapper -> writer: a decode thread prepares batches ahead of the encoder (bounded queue), the encoder runs in
the calling thread, and a writer thread compresses and writes finished shards. Work is indexed by shard id, so the
same `extract_shards` serves a local run (all pending shards), a resumed run (the shards not yet done) and a dask
worker (the shards it was handed).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import FeatureStore, StoreLayout, create_store, default_rows, store_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """One `pipe extract` invocation, resolved; persisted in the store attributes as `extract`."""

    encoder: str
    dataset: str
    split: str
    features: str
    root: str | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float16"
    limit: int | None = None
    image_size: int | None = None
    layer: str = "last"
    max_length: int = 64
    text: str = "auto"  # "captions", "prompts" (class templates) or "auto" (captions when the set has them)
    templates: tuple[str, ...] | None = None  # override the dataset's prompt templates
    resize: str = "auto"  # image encoders: "crop", "squash", or "auto" (squash when the set has masks)
    strict: bool = False  # a corrupt image fails the run instead of being skipped
    shard_rows: int | None = None
    options: tuple[tuple[str, Any], ...] = ()  # dataset options (e.g. world size, seed)
    threads: int | None = None  # torch threads per process (dask workers)


@dataclass
class ShardResult:
    shard: int
    rows: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    seconds: float = 0.0


# -- resolving ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _encoder(name: str, layer: str, image_size: int | None, max_length: int, device: str):
    from pipe_align.extract.encoders import load_encoder

    return load_encoder(name, layer=layer, image_size=image_size, max_length=max_length, device=device)


def _dataset(cfg: ExtractConfig):
    from pipe_align.extract.datasets import get_dataset

    return get_dataset(cfg.dataset, cfg.root, cfg.split, **dict(cfg.options))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PipeError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipeError(f"--device {device}: CUDA is not available on this machine")
    return device


@dataclass
class Job:
    """What a shard needs: the config, the dataset, the encoder, the rows to produce and the store."""

    cfg: ExtractConfig
    dataset: Any
    encoder: Any
    layout: StoreLayout
    path: str
    image_rows: list | None = None  # ImageRecord per row (image stores)
    text_rows: list[tuple[str, str, int]] | None = None  # (id, text, item) per row (text stores)


def _text_mode(cfg: ExtractConfig, dataset) -> str:
    if cfg.text not in ("auto", "captions", "prompts"):
        raise PipeError(f"--text must be auto, captions or prompts, got {cfg.text!r}")
    if cfg.text != "auto":
        return cfg.text
    return "captions" if dataset.captions() is not None else "prompts"


def plan(cfg: ExtractConfig) -> Job:
    """Resolve dataset, encoder, rows and the store layout (no writing)."""
    device = resolve_device(cfg.device)
    if cfg.batch_size < 1:
        raise PipeError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise PipeError(f"--limit must be >= 1, got {cfg.limit}")
    dataset = _dataset(cfg)
    enc = _encoder(cfg.encoder, cfg.layer, cfg.image_size, cfg.max_length, device)
    info = asdict(enc.info)
    images = dataset.images()
    limit = len(images) if cfg.limit is None else min(cfg.limit, len(images))
    classes = tuple(dataset.classes) if dataset.classes is not None else None
    if info["modality"] == "image":
        if cfg.resize not in ("auto", "crop", "squash"):
            raise PipeError(f"--resize must be auto, crop or squash, got {cfg.resize!r}")
        resize = cfg.resize if cfg.resize != "auto" else ("squash" if dataset.has_masks() else "crop")
        rows = images[:limit]
        if not rows:
            raise PipeError(f"dataset {cfg.dataset} split {cfg.split!r} has no images under {cfg.root}")
        grid = tuple(enc.grid)
        tokens, extra = grid[0] * grid[1], {"grid": grid, "resize": resize, "classes": classes}
        text_rows = None
    else:
        mode = _text_mode(cfg, dataset)
        if mode == "captions":
            caps = dataset.captions()
            if caps is None:
                raise PipeError(f"dataset {cfg.dataset} has no captions; use --text prompts")
            text_rows = [(c.id, c.text, c.item) for c in caps if c.item < limit]
            extra = {}
        else:
            if classes is None:
                raise PipeError(f"dataset {cfg.dataset} has no classes to build prompts from; use --text captions")
            templates = tuple(cfg.templates) if cfg.templates else tuple(dataset.templates())
            if not templates or any("{}" not in t for t in templates):
                raise PipeError(f"--templates: every template needs a '{{}}' for the class name, got {templates}")
            text_rows = [
                (f"{ci}:{ti}", t.replace("{}", c), ci) for ci, c in enumerate(classes) for ti, t in enumerate(templates)
            ]
            extra = {"classes": classes, "templates": templates}
        for rid, text, _ in text_rows:
            if not text.strip():
                raise PipeError(f"dataset {cfg.dataset} split {cfg.split}: caption {rid} is empty")
        if not text_rows:
            raise PipeError(f"dataset {cfg.dataset} split {cfg.split!r} has no captions")
        tokens, rows = enc.info.max_length, None
    count = len(rows) if rows is not None else len(text_rows)
    per_chunk, per_shard = default_rows(tokens, info["dim"], count, cfg.shard_rows)
    origin = {"root": None if cfg.root is None else str(cfg.root), "options": dict(cfg.options), "limit": cfg.limit}
    layout = StoreLayout(
        modality=info["modality"], encoder=info, dataset=cfg.dataset, split=cfg.split, count=count, tokens=tokens,
        dim=info["dim"], rows_per_chunk=per_chunk, rows_per_shard=per_shard, dtype=cfg.dtype, origin=origin, **extra,
    )  # fmt: skip
    suffix = ".prompts" if info["modality"] == "text" and "templates" in extra else ""
    path = store_path(cfg.features, cfg.dataset, cfg.split, cfg.encoder)
    path = path.with_name(path.name.replace(".zarr", f"{suffix}.zarr"))
    return Job(cfg, dataset, enc, layout, str(path), image_rows=rows, text_rows=text_rows)


# -- computing ------------------------------------------------------------------------------------------------------


def _to_store_dtype(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.detach().to("cpu")
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(torch.float16).numpy()


def _image_batches(job: Job, shards: list[int]) -> Iterator[tuple[int, int, torch.Tensor | None, list, list]]:
    """(shard, offset in shard, pixels of the readable rows, their offsets in the batch, skipped (offset, id, why))."""
    lay, bs = job.layout, job.cfg.batch_size
    for shard in shards:
        start, stop = lay.shard_range(shard)
        for b0 in range(start, stop, bs):
            images, skipped, keep = [], [], []
            for i in range(b0, min(b0 + bs, stop)):
                rec = job.image_rows[i]
                try:
                    img = job.dataset.load_image(i)
                    img.load()
                    images.append(img.convert("RGB"))
                    keep.append(i - b0)
                except Exception as e:  # noqa: BLE001 - any decode failure is a skipped row
                    if job.cfg.strict:
                        raise PipeError(f"dataset {job.cfg.dataset}: image {rec.id} is unreadable ({e})") from None
                    skipped.append((i - b0, rec.id, f"{type(e).__name__}: {e}"))
            pixels = job.encoder.preprocess(images, resize=job.layout.resize) if images else None
            yield shard, b0 - start, pixels, keep, skipped


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a thread, `depth` items ahead; exceptions re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def produce() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # noqa: BLE001
            q.put(e)
        q.put(end)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


class _Writer:
    """Writes finished shards in a background thread, one shard at a time (bounded: at most one waits)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store, self.error = store, None
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_shard(*item)
                except BaseException as e:  # noqa: BLE001
                    self.error = e

    def put(self, shard: int, rows: dict[str, np.ndarray], skipped: np.ndarray) -> None:
        if self.error:
            raise self.error
        self.q.put((shard, rows, skipped))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def _new_image_buffers(lay: StoreLayout, n: int) -> dict[str, np.ndarray]:
    feat = np.uint16 if lay.dtype == "bfloat16" else np.float16
    return {
        "cls": np.zeros((n, lay.dim), feat),
        "patches": np.zeros((n, lay.tokens, lay.dim), feat),
    }


def extract_shards(job: Job, store: FeatureStore, shards: list[int], on_rows: Callable[[int], None] | None = None):
    """Compute and write the given shards; returns a ShardResult per shard. The unit of work everywhere."""
    if job.cfg.threads:
        torch.set_num_threads(job.cfg.threads)
    writer = _Writer(store)
    results = []
    try:
        if job.layout.modality == "image":
            results = _image_shards(job, shards, writer, on_rows)
        else:
            results = _text_shards(job, shards, writer, on_rows)
    finally:
        writer.close()
    return results


def _image_shards(job, shards, writer, on_rows) -> list[ShardResult]:
    lay, results = job.layout, []
    cur, bufs, skipped, t0 = None, None, None, time.perf_counter()

    def flush() -> None:
        start, stop = lay.shard_range(cur.shard)
        recs = job.image_rows[start:stop]
        bufs["ids"] = np.array([r.id for r in recs], dtype=object).astype(str)
        bufs["labels"] = np.array([r.label for r in recs], dtype=np.int32)
        cur.seconds = time.perf_counter() - t0
        writer.put(cur.shard, bufs, skipped)
        results.append(cur)

    for shard, offset, pixels, keep, bad in prefetch(_image_batches(job, shards), depth=3):
        if cur is None or shard != cur.shard:
            if cur is not None:
                flush()
                t0 = time.perf_counter()
            start, stop = lay.shard_range(shard)
            cur, bufs = ShardResult(shard, stop - start), _new_image_buffers(lay, stop - start)
            skipped = np.zeros(stop - start, bool)
        if pixels is not None:
            cls, patches = job.encoder.encode(pixels)
            idx = offset + np.asarray(keep)
            bufs["cls"][idx] = _to_store_dtype(cls, lay.dtype)
            bufs["patches"][idx] = _to_store_dtype(patches, lay.dtype)
        for row, rid, reason in bad:
            skipped[offset + row] = True
            cur.skipped.append((rid, reason))
        if on_rows:
            on_rows(len(keep) + len(bad))
    if cur is not None:
        flush()
    return results


def _text_shards(job, shards, writer, on_rows) -> list[ShardResult]:
    lay, bs, results = job.layout, job.cfg.batch_size, []
    feat = np.uint16 if lay.dtype == "bfloat16" else np.float16
    for shard in shards:
        t0 = time.perf_counter()
        start, stop = lay.shard_range(shard)
        rows = job.text_rows[start:stop]
        n = stop - start
        bufs = {
            "ids": np.array([r[0] for r in rows], dtype=object).astype(str),
            "text": np.array([r[1] for r in rows], dtype=object).astype(str),
            "item": np.array([r[2] for r in rows], dtype=np.int64),
            "tokens": np.zeros((n, lay.tokens, lay.dim), feat),
            "length": np.zeros(n, np.int16),
            "pooled": np.zeros((n, lay.dim), feat),
        }
        for b0 in range(0, n, bs):
            tokens, length, pooled = job.encoder.encode([r[1] for r in rows[b0 : b0 + bs]])
            sl = slice(b0, b0 + len(length))
            bufs["tokens"][sl] = _to_store_dtype(tokens, lay.dtype)
            bufs["length"][sl] = np.asarray(length, dtype=np.int16)
            bufs["pooled"][sl] = _to_store_dtype(pooled, lay.dtype)
            if on_rows:
                on_rows(len(length))
        writer.put(shard, bufs, np.zeros(n, bool))
        results.append(ShardResult(shard, n, seconds=time.perf_counter() - t0))
    return results


# -- driving --------------------------------------------------------------------------------------------------------


@dataclass
class ExtractSummary:
    path: str
    rows: int
    written_rows: int
    skipped: list[tuple[str, str]]
    seconds: float
    already_complete: bool = False


def run_extract(cfg: ExtractConfig, cluster: str | None = None, progress: bool = True) -> ExtractSummary:
    """Plan, create (or reopen) the store, compute the pending shards locally or on a dask cluster, finalize."""
    job = plan(cfg)
    store = create_store(job.path, job.layout)
    t0 = time.perf_counter()
    if store.complete:
        return ExtractSummary(job.path, job.layout.count, 0, [], 0.0, already_complete=True)
    pending = store.pending_shards()
    lay = job.layout
    todo_rows = sum(lay.shard_range(s)[1] - lay.shard_range(s)[0] for s in pending)
    with _progress(progress, f"{cfg.dataset}/{cfg.split} {cfg.encoder}", todo_rows) as advance:
        if cluster:
            from pipe_align.extract.distributed import run_on_cluster

            results = run_on_cluster(cfg, pending, cluster, advance)
        else:
            results = extract_shards(job, store, pending, on_rows=advance)
    skipped = [s for r in results for s in r.skipped]
    store.finalize({"extract": _config_attrs(cfg)})
    return ExtractSummary(job.path, lay.count, sum(r.rows for r in results), skipped, time.perf_counter() - t0)


def _config_attrs(cfg: ExtractConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["options"] = dict(cfg.options)
    d.pop("threads")
    d.pop("features")  # the store's own location is not part of what it holds
    return d


class _progress:
    """A rich progress bar (rows, rows/s, ETA) when asked for; a no-op otherwise."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[progress.percentage]{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False,
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")
        self.t0, self.done = time.perf_counter(), 0

        def advance(n: int) -> None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} rows/s")

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))
