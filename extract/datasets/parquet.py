"""`parquet`: image-caption pairs in parquet files, as Hugging Face datasets exports them (an `image` column of
`{bytes, path}` structs, or raw bytes, and a `text` column).

Needs pyarrow, an optional dependency (`pip install 'pipe-align[parquet]'`). Files are read one row group at a time:
opening the reader reads only the caption (and id) columns; `load_image` reads the image column of the row group
holding its row and keeps at most two such row groups, so memory is bounded by the files' row-group size, never by
their total size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import PipeError
from .base import (
    Caption,
    Dataset,
    ImageRecord,
    UnreadableImage,
    open_rgb,
    register_dataset,
)
from .pairs import (
    PairGroups,
    caption_texts,
    decode_image,
    open_source,
    source_files,
    string_option,
)

ROW_GROUPS_KEPT = 2  # a batch of rows may straddle two row groups


def parquet_module() -> Any:
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PipeError("dataset 'parquet' needs pyarrow: pip install 'pipe-align[parquet]'") from None
    return pq


def _damaged(path: Path, e: Exception, where: str = "") -> PipeError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return PipeError(f"damaged parquet file {path}{where}: {text[:200]}")


@register_dataset("parquet")
class ParquetPairs(Dataset):
    """Rows of one or more parquet files (a file, a folder of them, a glob or a brace pattern), in file order. Each
    row is one image with the caption(s) of its `caption_key` cell (a string or a list of strings); with
    `-o id_key=COLUMN`, rows with the same value there are one image (its bytes from the first such row) and the
    value is the id. Otherwise the id is `<file stem>/<row in the file>`. Captions `<image id>#<j>`."""

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        *,
        image_key: str = "image",
        caption_key: str = "text",
        id_key: str | None = None,
    ) -> None:
        super().__init__(root, split)
        pq = parquet_module()
        self.image_key = string_option(self.name, "image_key", image_key)
        caption_key = string_option(self.name, "caption_key", caption_key)
        id_key = None if id_key is None else string_option(self.name, "id_key", id_key)
        self.files = source_files(self.name, root, (".parquet",), "parquet files")
        groups = PairGroups(self.name)
        for fi, path in enumerate(self.files):
            row, g = 0, None
            try:
                with open_source(path) as f:
                    pf = pq.ParquetFile(f)
                    self._check_columns(path, pf.schema_arrow, caption_key, id_key)
                    for g in range(pf.num_row_groups):
                        cols = [caption_key] + ([id_key] if id_key else [])
                        table = pf.read_row_group(g, columns=cols, use_threads=False)
                        texts = table.column(caption_key).to_pylist()
                        ids = table.column(id_key).to_pylist() if id_key else [None] * len(texts)
                        for j, (text, rid) in enumerate(zip(texts, ids)):
                            where = f"{path} row {row}"
                            key = self._id(path, row, rid, id_key, where)
                            groups.add(key, key, (fi, g, j), caption_texts(text, where), where)
                            row += 1
            except PipeError:
                raise
            except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ... for a damaged file)
                raise _damaged(path, e, f" (row group {g})" if g is not None else "") from None
        if not len(groups):
            raise PipeError(f"dataset '{self.name}': no rows in {len(self.files)} parquet file(s) under --root {root}")
        self._records: list[ImageRecord] = groups.records
        self._sources: list[tuple[int, int, int]] = groups.sources  # type: ignore[assignment]
        self._captions: list[Caption] = groups.captions()
        self._init_cache()

    def _check_columns(self, path: Path, schema: Any, caption_key: str, id_key: str | None) -> None:
        names = list(schema.names)
        for col, option in ((self.image_key, "image_key"), (caption_key, "caption_key"), (id_key, "id_key")):
            if col is not None and col not in names:
                raise PipeError(
                    f"{path} has no column '{col}' (columns: {', '.join(names)}); choose one with -o {option}="
                )
        kind = schema.field(self.image_key).type
        fields = [kind.field(k).name for k in range(kind.num_fields)] if str(kind).startswith("struct") else []
        if "bytes" not in fields and str(kind) not in ("binary", "large_binary"):
            raise PipeError(
                f"{path}: column '{self.image_key}' is {kind}, not image bytes (binary, or a struct with "
                "'bytes' as Hugging Face writes images)"
            )

    @staticmethod
    def _id(path: Path, row: int, value: object, id_key: str | None, where: str) -> str:
        if id_key is None:
            return f"{path.stem}/{row}"
        if value is None or isinstance(value, (bool, float, list, dict)) or not str(value).strip():
            raise PipeError(f"{where}: id ('{id_key}') is empty or not an id: {value!r:.60}")
        return str(value).strip()

    # -- images -----------------------------------------------------------------------------------------------------

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock")
        state.pop("_cache")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def _column(self, fi: int, g: int) -> Any:
        """The image column of one row group, read once and kept while rows of it are decoded."""
        with self._lock:
            col = self._cache.get((fi, g))
            if col is not None:
                self._cache.move_to_end((fi, g))
                return col
            path = self.files[fi]
            try:
                with open_source(path) as f:  # one thread: the decode threads already keep the cores busy
                    pf = parquet_module().ParquetFile(f)
                    table = pf.read_row_group(g, columns=[self.image_key], use_threads=False)
                col = table.column(self.image_key).combine_chunks()
            except Exception as e:  # noqa: BLE001 (the file, not one image: every row of it is suspect)
                raise _damaged(path, e, f" (row group {g})") from None
            self._cache[(fi, g)] = col
            while len(self._cache) > ROW_GROUPS_KEPT:
                self._cache.popitem(last=False)
            return col

    def images(self) -> list[ImageRecord]:
        return self._records

    def captions(self) -> list[Caption] | None:
        return self._captions

    def load_image(self, i: int) -> Image.Image:
        fi, g, j = self._sources[i]
        col = self._column(fi, g)
        where = f"{self.files[fi]} ({self._records[i].id})"
        if col.type.num_fields:  # {bytes, path}
            data = col.field("bytes")[j].as_py() if col[j].is_valid else None
            ref = col.field("path")[j].as_py() if col[j].is_valid and col.type.get_field_index("path") >= 0 else None
            if data is None and ref:  # an image kept as a file beside the parquet file, not embedded
                return open_rgb(self.files[fi].parent / ref)
        else:
            data = col[j].as_py()
        if data is None:
            raise UnreadableImage(f"{where}: row has no image bytes")
        return decode_image(data, where)
