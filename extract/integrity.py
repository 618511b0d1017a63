"""What makes damage to a feature store detectable (format `crc32c/1`, docs/store.md "Integrity").

Three things, each for a kind of damage the others miss:
- every chunk, inner chunks of sharded arrays and shard indexes included, ends in a crc32c (zarr's `crc32c` codec):
  a changed or truncated chunk fails its checksum when it is read;
- every chunk is written, even one equal to the fill value, so in a complete store a chunk file that is absent was
  lost: `StrictStore` makes reading it an error instead of the fill value (zarr 3.1 has no option for that; later
  releases call it `array.read_missing_chunks`);
- the `digest` array holds, per row and per array, the crc32c of the row index and the row's stored bytes
  (`row_digests`): a shard file moved to another place, or replaced by one from another store of the same layout,
  passes its chunk checksums but not these. `pipe verify` recomputes them; readers rely on the first two.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from zarr.abc.store import ByteRequest
from zarr.codecs import Crc32cCodec, ShardingCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .errors import PipeError

CHECKSUMS = "crc32c/1"


class DamagedStore(PipeError):
    """A store whose files do not hold what was written: one line naming the store and the array."""

    def __init__(self, path: str | Path, array: str, reason: str) -> None:
        self.path, self.array, self.reason = str(path), array, reason
        super().__init__(f"{path}: array {array!r} is damaged: {reason} (see `pipe verify`)")


class StrictStore(WrapperStore):
    """A store (local, or fsspec for a URL) on which an absent chunk is an error once `strict` is set (complete stores
    with checksums)."""

    def __init__(self, store: LocalStore | FsspecStore, strict: bool = False) -> None:
        super().__init__(store)
        self.strict = strict

    def _with_store(self, store: LocalStore | FsspecStore) -> StrictStore:
        return type(self)(store, self.strict)

    def _check(self, key: str, buf: Buffer | None) -> Buffer | None:
        if buf is None and self.strict and not key.endswith("zarr.json"):
            array, _, rest = key.partition("/")
            where = getattr(self._store, "root", None) or _url(self._store)
            raise DamagedStore(where, array, f"chunk file {array}/{rest} is missing")
        return buf

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, buf) for (key, _), buf in zip(key_ranges, bufs, strict=True)]


def _url(store: FsspecStore) -> str:
    protocol = store.fs.protocol
    return f"{protocol[0] if isinstance(protocol, (tuple, list)) else protocol}://{store.path}"


def damage_reason(e: BaseException) -> str:
    """What a failed chunk read means to the user, in a few words."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "checksum" in text.lower():
        return "a chunk fails its crc32c checksum (changed, truncated or zeroed file)"
    return f"a chunk cannot be decoded ({type(e).__name__}: {text[:160]})"


# What a damaged chunk raises inside zarr: a checksum mismatch (ValueError), a shard index or compressed frame that
# cannot be parsed (ValueError, RuntimeError from numcodecs, EOFError), a file that cannot be read (OSError).
READ_ERRORS = (ValueError, RuntimeError, EOFError, OSError)


def has_checksums(arr: Any) -> bool:
    """Whether an array's chunks (and, when sharded, its inner chunks and shard index) end in a crc32c."""
    codecs = arr.metadata.codecs
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        shard = codecs[0]
        return any(isinstance(c, Crc32cCodec) for c in shard.codecs) and any(
            isinstance(c, Crc32cCodec) for c in shard.index_codecs
        )
    return any(isinstance(c, Crc32cCodec) for c in codecs)


# Bits of +inf: a 16-bit float is NaN or inf exactly when its bits without the sign are at least these.
INF_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def non_finite_rows(block: np.ndarray, dtype: str) -> np.ndarray:
    """bool [n]: rows of a block of stored features (float16, or bfloat16 as uint16 bits) holding NaN or inf. Reads
    the bits: about ten times faster than torch.isfinite on float16 (tested against np.isfinite)."""
    bits = np.ascontiguousarray(block).view(np.uint16).reshape(len(block), -1)
    if bits.shape[1] == 0:
        return np.zeros(len(block), bool)
    return (bits & 0x7FFF).max(axis=1) >= INF_BITS[dtype]


def row_digests(start: int, block: np.ndarray) -> np.ndarray:
    """uint32 [n]: crc32c of (row index as int64 little-endian, the row's stored bytes) for rows start.. of a block.
    Strings count as their UTF-8 bytes; numbers as their bytes in the array's own dtype."""
    n = len(block)
    out = np.empty(n, np.uint32)
    if n == 0:
        return out
    if block.dtype.kind in "OTU":
        rows: Any = [str(s).encode("utf-8") for s in block]
    else:
        rows = np.ascontiguousarray(block).reshape(n, -1).view(np.uint8)
    for i in range(n):
        seed = google_crc32c.value((start + i).to_bytes(8, "little"))
        out[i] = google_crc32c.extend(seed, rows[i])
    return out
