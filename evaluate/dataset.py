"""The dataset reader behind a store: its label-space facts, opening it, matching its items to store rows, images
for figures.

Label-space facts (void value, background class, "label 0 is unlabelled") are class attributes of the reader
(`extract.datasets.base.Dataset`), looked up by the dataset name the store records: no dataset file is needed, so
classification runs from the stores alone. Evaluation code never tests dataset names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipe_align.extract.datasets import Dataset, dataset_class, get_dataset
from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import FeatureStore, origin_difference

from .config import EvalConfig
from .context import EvalContext


def reader_class(store: FeatureStore) -> type[Dataset]:
    """The reader registered under the store's dataset name; hand-written stores of a name no reader has get the
    interface's defaults (255 void, no background, no ignored label)."""
    try:
        return dataset_class(store.layout.dataset)
    except PipeError:
        return Dataset


def open_dataset(cfg: EvalConfig) -> Dataset:
    return get_dataset(cfg.dataset, cfg.root, cfg.split, **dict(cfg.options))


def check_origin(store: FeatureStore, cfg: EvalConfig) -> None:
    """Masks are matched to store rows by id, and some datasets (the world) reuse ids across options: the dataset
    opened for evaluation must be the one the store was extracted from (root and -o options, as recorded)."""
    origin = store.layout.origin
    if origin_difference(origin, {"root": cfg.root, "options": dict(cfg.options)}, keys=("root", "options")):
        want = {k: str(v) for k, v in (origin.get("options") or {}).items()}
        opts = " ".join(f"-o {k}={v}" for k, v in sorted(want.items())) or "no -o options"
        raise PipeError(
            f"{store.path}: was extracted from --root {origin.get('root')} with {opts}; evaluate with the same"
        )


def dataset_rows(dataset: Dataset, ids: np.ndarray, where: Path) -> np.ndarray:
    """Dataset index of each store row, matched by id (the store may hold a prefix of the split, or another order)."""
    index = {r.id: i for i, r in enumerate(dataset.images())}
    out = np.empty(len(ids), dtype=np.int64)
    for row, rid in enumerate(ids):
        i = index.get(str(rid))
        if i is None:
            raise PipeError(
                f"{where}: row {row} has id {rid!r}, which dataset {dataset.name}/{dataset.split} lacks "
                "(--root or -o options differ from the extraction?)"
            )
        out[row] = i
    return out


def image_or_none(dataset: Dataset, index: int) -> np.ndarray | None:
    """Item `index` as an RGB array for a figure, or None when it cannot be read (the figure is drawn without it)."""
    try:
        return np.asarray(dataset.load_image(index).convert("RGB"))
    except PipeError:
        return None


def figure_images(ctx: EvalContext, rows: list[int], notes: list[str]) -> list[np.ndarray | None]:
    """Images of some image-store rows for figures; all None (with a note) when the reader cannot be opened."""
    try:
        ds = open_dataset(ctx.cfg)
        index = dataset_rows(ds, ctx.image.read("ids"), ctx.image.path)
    except PipeError as e:
        notes.append(f"figures drawn without images ({e})")
        return [None] * len(rows)
    return [image_or_none(ds, int(index[r])) for r in rows]
