"""Blocked reading of store rows: evaluations never hold a whole token store in memory.

Rows are read in blocks of whole chunks that tile a shard (at most a few hundred MB of float32 per block), embedded,
and only the small per-row outputs ([N, E] embeddings, logits, confusion matrices) are kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from pipe_align.align.base import Aligner, ImageRows, TextRows
from pipe_align.extract.store import FeatureStore

BLOCK_BYTES = 128 << 20  # float32 bytes of token rows per read block (a shard or an exact fraction of one)


def row_blocks(store: FeatureStore, tokens: bool = True, budget: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges: whole chunks, an exact divisor of a shard, under `budget` float32 bytes."""
    lay = store.layout
    row_bytes = (lay.tokens if tokens else 1) * lay.dim * 4
    rows = lay.rows_per_shard
    if lay.rows_per_shard % lay.rows_per_chunk == 0:  # always so for stores written by pipe extract
        chunks = lay.rows_per_shard // lay.rows_per_chunk
        fits = [d for d in range(1, chunks + 1) if chunks % d == 0 and d * lay.rows_per_chunk * row_bytes <= budget]
        rows = max(fits or [1]) * lay.rows_per_chunk
    for start in range(0, lay.count, rows):
        yield start, min(start + rows, lay.count)


def image_rows(store: FeatureStore, start: int, stop: int, patches: bool, device: str) -> ImageRows:
    """Rows as float32 on the device (stores hold float16 or bfloat16)."""
    cls = store.rows("cls", start, stop).float().to(device)
    pt = store.rows("patches", start, stop).float().to(device) if patches else None
    return ImageRows(cls=cls, patches=pt)


def text_rows(store: FeatureStore, start: int, stop: int, tokens: bool, device: str) -> TextRows:
    rows = TextRows(pooled=store.rows("pooled", start, stop).float().to(device))
    if tokens:
        rows.tokens = store.rows("tokens", start, stop).float().to(device)
        rows.length = torch.from_numpy(store.read("length", slice(start, stop)).astype(np.int64)).to(device)
    return rows


@torch.no_grad()
def embed_images(aligner: Aligner, store: FeatureStore, device: str) -> Tensor:
    """image_global of every row [N, E] on the CPU (skipped rows included; callers drop them)."""
    out = []
    for start, stop in row_blocks(store, tokens=aligner.needs_tokens):
        out.append(aligner.image_global(image_rows(store, start, stop, aligner.needs_tokens, device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(aligner: Aligner, store: FeatureStore, device: str) -> Tensor:
    """text_global of every row [M, E] on the CPU."""
    out = []
    for start, stop in row_blocks(store, tokens=aligner.needs_tokens):
        out.append(aligner.text_global(text_rows(store, start, stop, aligner.needs_tokens, device)).float().cpu())
    return torch.cat(out)
