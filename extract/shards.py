"""One shard of a store, computed and written: the unit of work of every executor (local, resumed, dask worker).

Reader -> mapper -> writer: a pool of decode threads prepares batches ahead of the encoder (bounded queue, pinned
memory on CUDA), the encoder runs in the calling thread (batch i+1's forward is queued on the GPU before batch i's
features are copied back), and a writer thread compresses and writes finished shards. Work is indexed by shard id
and rows are written by index, so the order in which shards are handed out never changes a byte of the store.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .datasets.base import UnreadableImage, to_rgb
from .errors import PipeError
from .job import Job
from .runtime import prefetch
from .store import FeatureStore, StoreLayout

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


STORE_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DECODE_THREADS = max(1, min(16, os.cpu_count() or 1))
"""Threads that read, decode and resize images (PIL and numpy release the GIL): one GPU needs thousands a second."""


def _to_store_dtype(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Features as the store holds them (bfloat16 as its uint16 bit pattern); integer tensors as they are."""
    if not x.is_floating_point():
        return x.detach().to("cpu").numpy()
    x = x.detach().to(STORE_TORCH[dtype]).to("cpu")
    return x.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else x.numpy()


class _Pending:
    """Features of one batch on their way to host memory: cast to the store dtype on the device, copied into pinned
    memory without blocking, so the next batch's forward is queued before this one is waited for."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], dtype: str) -> None:
        self.dtype = dtype
        if tensors and tensors[0].is_cuda:
            self.host = tuple(
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors
            )
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensors, None

    def numpy(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [_to_store_dtype(t, self.dtype) for t in self.host]


def _load_one(job: Job, i: int) -> torch.Tensor | BaseException:
    """Pixels of row i, or the exception that says why the file is unreadable (decided by the caller)."""
    try:
        img = job.dataset.load_image(i)
        img.load()
        return job.encoder.preprocess_one(to_rgb(img), resize=job.layout.resize)
    except UNREADABLE as e:
        return e


def _image_batches(job: Job, shards: list[int]) -> Iterator[tuple[int, int, torch.Tensor | None, list, list]]:
    """(shard, offset in shard, pixels of the readable rows, their offsets in the batch, skipped (offset, id, why)).
    Rows are decoded by a pool of threads, in order; pixels go into pinned memory when the encoder is on CUDA."""
    lay, bs = job.layout, job.cfg.batch_size
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="pipe-decode") as pool:
        for shard in shards:
            start, stop = lay.shard_range(shard)
            for b0 in range(start, stop, bs):
                loaded = list(pool.map(lambda i: _load_one(job, i), range(b0, min(b0 + bs, stop))))
                skipped, keep = [], []
                for offset, item in enumerate(loaded):
                    if isinstance(item, BaseException):
                        rec = job.image_rows[b0 + offset]
                        if job.cfg.strict:
                            raise PipeError(f"dataset {job.cfg.dataset}: image {rec.id} is unreadable ({item})")
                        skipped.append((offset, rec.id, f"{type(item).__name__}: {item}"))
                    else:
                        keep.append(offset)
                pixels = None
                if keep:
                    pixels = job.encoder.pixel_buffer(len(keep))
                    for row, offset in enumerate(keep):
                        pixels[row] = loaded[offset]
                yield shard, b0 - start, pixels, keep, skipped


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
    return PipeError(
        f"{path}: {error.strerror or 'no space left'} while {doing}; free space and re-run the same "
        "command (finished shards are kept, the store is not marked complete)"
    )


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
    pending: tuple[_Pending, np.ndarray] | None = None  # the previous batch's features, still on their way

    def land() -> None:
        nonlocal pending
        if pending is not None:
            (cls, patches), idx = pending[0].numpy(), pending[1]
            bufs["cls"][idx] = cls
            bufs["patches"][idx] = patches
            pending = None

    def flush() -> None:
        land()
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
            out = job.encoder.encode(pixels, out_dtype=STORE_TORCH[lay.dtype])  # queued on a GPU, not waited for
            land()  # the previous batch's copy overlapped this batch's forward
            pending = (_Pending(out, lay.dtype), offset + np.asarray(keep))
        for row, rid, reason in bad:
            skipped[offset + row] = True
            cur.skipped.append((rid, reason))
        if on_rows:
            on_rows(len(keep) + len(bad))
    if cur is not None:
        flush()
    return results


def _text_batches(job: Job, shards: list[int]) -> Iterator[tuple[int, int, dict]]:
    """(shard, offset in shard, tokenized batch): the tokenizer runs in the prefetch thread (it releases the GIL)."""
    lay, bs = job.layout, job.cfg.batch_size
    for shard in shards:
        start, stop = lay.shard_range(shard)
        for b0 in range(start, stop, bs):
            yield shard, b0 - start, job.encoder.tokenize([r[1] for r in job.text_rows[b0 : min(b0 + bs, stop)]])


def _text_shards(job, shards, writer, on_rows) -> list[ShardResult]:
    lay, results, feat = job.layout, [], np.uint16 if job.layout.dtype == "bfloat16" else np.float16
    cur, bufs, t0 = None, None, time.perf_counter()
    pending: tuple[_Pending, slice] | None = None

    def land() -> None:
        nonlocal pending
        if pending is not None:
            (tokens, pooled, length), sl = pending[0].numpy(), pending[1]
            rows = job.text_rows[lay.shard_range(cur.shard)[0] :]
            if not bool(length.min() > 0):
                rid, text = rows[sl.start + int(length.argmin())][:2]
                raise PipeError(
                    f"dataset {job.cfg.dataset} split {job.cfg.split}: caption {rid} ({text!r}) has no "
                    f"tokens for encoder {job.cfg.encoder} (its tokenizer drops every character)"
                )
            bufs["tokens"][sl], bufs["pooled"][sl] = tokens, pooled
            bufs["length"][sl] = length.astype(np.int16)
            if on_rows:
                on_rows(len(length))
            pending = None

    def flush() -> None:
        land()
        writer.put(cur.shard, bufs, np.zeros(cur.rows, bool))
        cur.seconds = time.perf_counter() - t0
        results.append(cur)

    for shard, offset, batch in prefetch(_text_batches(job, shards), depth=3):
        if cur is None or shard != cur.shard:
            if cur is not None:
                flush()
                t0 = time.perf_counter()
            start, stop = lay.shard_range(shard)
            rows, n = job.text_rows[start:stop], stop - start
            cur = ShardResult(shard, n)
            bufs = {
                "ids": np.array([r[0] for r in rows], dtype=object).astype(str),
                "text": np.array([r[1] for r in rows], dtype=object).astype(str),
                "item": np.array([r[2] for r in rows], dtype=np.int64),
                "tokens": np.zeros((n, lay.tokens, lay.dim), feat),
                "length": np.zeros(n, np.int16),
                "pooled": np.zeros((n, lay.dim), feat),
            }
        tokens, length, pooled = job.encoder.encode_batch(batch, out_dtype=STORE_TORCH[lay.dtype])
        land()
        pending = (_Pending((tokens, pooled, length), lay.dtype), slice(offset, offset + len(length)))
    if cur is not None:
        flush()
    return results
