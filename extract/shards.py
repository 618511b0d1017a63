"""One shard of a store, computed and written: the unit of work of every executor (local, resumed, dask worker).

Reader -> mapper -> writer: a decode thread prepares batches ahead of the encoder (bounded queue), the encoder runs in
the calling thread, and a writer thread compresses and writes finished shards. Work is indexed by shard id and rows
are written by index, so the order in which shards are handed out never changes a byte of the store.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipe_align.extract.datasets.base import UnreadableImage, to_rgb
from pipe_align.extract.errors import PipeError
from pipe_align.extract.job import Job
from pipe_align.extract.store import FeatureStore, StoreLayout

# What an unreadable or corrupt file raises, and nothing else: readers raise UnreadableImage; PIL raises OSError for a
# file it cannot identify (UnidentifiedImageError) or that is truncated, SyntaxError for a malformed one (a broken
# PNG chunk) and DecompressionBombError for an absurd size. Any other exception is a bug and fails the run.
UNREADABLE = (UnreadableImage, OSError, SyntaxError, Image.DecompressionBombError)
# A full disk or an exceeded quota while writing: the user frees space and re-runs; finished shards are kept.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class ShardResult:
    shard: int
    rows: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    seconds: float = 0.0


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
                    images.append(to_rgb(img))
                    keep.append(i - b0)
                except UNREADABLE as e:
                    if job.cfg.strict:
                        raise PipeError(f"dataset {job.cfg.dataset}: image {rec.id} is unreadable ({e})") from None
                    skipped.append((i - b0, rec.id, f"{type(e).__name__}: {e}"))
            pixels = job.encoder.preprocess(images, resize=job.layout.resize) if images else None
            yield shard, b0 - start, pixels, keep, skipped


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a thread, `depth` items ahead; exceptions re-raise in the consumer. When the consumer stops
    early (an error, a break) the producer is stopped and joined, so no thread is left decoding while the process
    reports the error and exits (a daemon thread busy at interpreter shutdown can abort it)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in it:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001
            put(e)
        put(end)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


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
                except OSError as e:
                    self.error = disk_full(e, self.store.path, f"writing shard {item[0]}") or e
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


def disk_full(error: OSError, path, doing: str) -> PipeError | None:
    """A full disk or quota as a one-line error naming the store (None for any other OSError)."""
    if error.errno not in DISK_FULL:
        return None
    return PipeError(f"{path}: {error.strerror or 'no space left'} while {doing}; free space and re-run the same "
                     "command (finished shards are kept, the store is not marked complete)")


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
            if not bool(length.min() > 0):
                rid, text = rows[b0 + int(length.argmin())][:2]
                raise PipeError(f"dataset {job.cfg.dataset} split {job.cfg.split}: caption {rid} ({text!r}) has no "
                                f"tokens for encoder {job.cfg.encoder} (its tokenizer drops every character)")
            sl = slice(b0, b0 + len(length))
            bufs["tokens"][sl] = _to_store_dtype(tokens, lay.dtype)
            bufs["length"][sl] = np.asarray(length, dtype=np.int16)
            bufs["pooled"][sl] = _to_store_dtype(pooled, lay.dtype)
            if on_rows:
                on_rows(len(length))
        writer.put(shard, bufs, np.zeros(n, bool))
        results.append(ShardResult(shard, n, seconds=time.perf_counter() - t0))
    return results
