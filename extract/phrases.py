"""Phrase spans of a caption store: which stored tokens each marked phrase covers, and its entity.

A caption store of a dataset with phrase markup (Flickr30k Entities, the world) holds one more array, `phrases`
[S, 5] int32: (caption row, first token, token stop, entity, k = the phrase's index among its caption's marked
phrases: row f"{caption id}/{k}" of the phrase store), in caption order then phrase order, with the attribute
`phrases` = PHRASES_FORMAT. It is written after every shard and before the store is marked complete.

Token positions are computed from the tokenizer's character offsets, so they stay right whichever tokens the store
keeps: with the special tokens ([CLS]/[SEP], <s></s>) kept, stored position t is the tokenizer's position t; with
them dropped, it is the t-th non-special token. Which of the two a store holds is read from its stored lengths (a
row holds all its tokens or only the non-special ones), never assumed. A phrase keeps every token whose characters
overlap it; a phrase cut off by truncation keeps its stored tokens, and one wholly cut off is dropped (counted in the
store's attribute `phrases_dropped`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec, ZstdCodec

from .datasets.base import Caption
from .errors import PipeError
from .store import FeatureStore

PHRASES_FORMAT = "pipe.phrases/1"
COLUMNS = ("row", "start", "stop", "entity", "phrase")


def kept_positions(
    offsets: list[tuple[int, int]], special: list[int], length: int, keeps_special: bool | None
) -> list[int]:
    """Tokenizer positions of the stored tokens 0..length-1 of one caption. keeps_special None: decided by the
    stored length (all tokens, or the non-special ones)."""
    everything = list(range(len(offsets)))
    words = [i for i in everything if not special[i]]
    if keeps_special is None:
        keeps_special = length == len(everything) and length != len(words)
    return (everything if keeps_special else words)[:length]


def token_span(offsets: list[tuple[int, int]], positions: list[int], start: int, stop: int) -> tuple[int, int] | None:
    """[first, stop) over stored positions whose characters overlap text[start:stop]; None when none does."""
    hit = [
        t
        for t, p in enumerate(positions)
        if offsets[p][1] > offsets[p][0] and offsets[p][0] < stop and offsets[p][1] > start
    ]
    return (hit[0], hit[-1] + 1) if hit else None


def store_keeps_special(tokenizer: Any, texts: list[str], lengths: np.ndarray) -> bool:
    """Whether the store holds special tokens: its untruncated rows' lengths say so (every row agrees or the store is
    not one encoder's); a store without any such row keeps none where its tokenizer adds none."""
    votes = set()
    for text, length in zip(texts, lengths, strict=True):
        enc = tokenizer(text, return_special_tokens_mask=True, truncation=False)
        n_all, n_words = len(enc["input_ids"]), len(enc["input_ids"]) - sum(enc["special_tokens_mask"])
        if n_all != n_words and length in (n_all, n_words):
            votes.add(int(length) == n_all)
        if len(votes) > 1:
            raise PipeError("caption lengths disagree on whether special tokens are stored (rows from two encoders?)")
    return votes.pop() if votes else False


def phrase_table(tokenizer: Any, captions: list[Caption], lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """([S, 5] int32 rows (caption row, start, stop, entity, phrase index), phrases dropped by truncation)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PipeError(f"phrase spans need a fast tokenizer (character offsets); {type(tokenizer).__name__} is not")
    marked = [i for i, c in enumerate(captions) if c.phrases]
    probe = [i for i in marked if lengths[i] < lengths.max()] or marked  # rows surely not truncated first
    keeps = store_keeps_special(tokenizer, [captions[i].text for i in probe[:64]], lengths[probe[:64]])
    rows, dropped = [], 0
    for i in marked:
        cap = captions[i]
        enc = tokenizer(cap.text, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=False)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        positions = kept_positions(offsets, enc["special_tokens_mask"], int(lengths[i]), keeps)
        for k, ph in enumerate(cap.phrases):
            span = token_span(offsets, positions, ph.start, ph.stop)
            if span is None:
                dropped += 1
                continue
            rows.append((i, span[0], span[1], ph.entity, k))
    return np.array(rows, dtype=np.int32).reshape(-1, 5), dropped


def write_phrases(store: FeatureStore, tokenizer: Any, captions: list[Caption]) -> None:
    """Compute and write the `phrases` array of a finished caption store (before it is marked complete)."""
    ids = store.read("ids")
    if [c.id for c in captions] != [str(x) for x in ids]:
        raise PipeError(f"{store.path}: its caption rows are not the dataset's captions (ids differ)")
    table, dropped = phrase_table(tokenizer, captions, store.read("length").astype(np.int64))
    if "phrases" in store.group:
        del store.group["phrases"]
    arr = store.group.create_array(
        "phrases",
        shape=table.shape,
        dtype="int32",
        chunks=(max(len(table), 1), 5),
        compressors=(ZstdCodec(level=3), Crc32cCodec()),
    )
    arr[:] = table
    store.group.attrs.update({"phrases": PHRASES_FORMAT, "phrases_dropped": dropped})


def read_phrases(store: FeatureStore) -> np.ndarray | None:
    """[S, 5] (row, start, stop, entity, phrase index) of a caption store, or None when it has none; checked against
    the store's rows and lengths (a damaged table is a one-line error)."""
    if store.attrs.get("phrases") != PHRASES_FORMAT:
        return None
    try:
        table = np.asarray(store.group["phrases"][:], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any read failure is the same damage to the user
        raise PipeError(f"{store.path}: array 'phrases' cannot be read ({type(e).__name__})") from None
    if table.ndim != 2 or table.shape[1] != len(COLUMNS):
        raise PipeError(f"{store.path}: array 'phrases' has shape {table.shape}, expected [S, {len(COLUMNS)}]")
    if len(table):
        length = store.read("length").astype(np.int64)
        rows, start, stop = table[:, 0], table[:, 1], table[:, 2]
        bad = (rows < 0) | (rows >= store.layout.count)
        bad |= ~bad & ((start < 0) | (stop <= start) | (stop > length[np.clip(rows, 0, store.layout.count - 1)]))
        if bad.any():
            raise PipeError(f"{store.path}: array 'phrases' row {int(np.argmax(bad))} is not a span of its caption")
    return table
