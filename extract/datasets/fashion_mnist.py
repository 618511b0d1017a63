"""Fashion-MNIST from its idx files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]), as Debian ships them."""

from __future__ import annotations

import gzip
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import (
    Caption,
    Dataset,
    ImageRecord,
    bool_option,
    inside,
    int_option,
    register_dataset,
    require_root,
)
from .roots import find_under, has_files

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Plain-word class names and sentence forms for the caption pairs (the eval prompts use `templates()` instead).
CAPTION_NAMES = [
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
CAPTION_TEMPLATES = [
    "a grey picture of a {}.",
    "an image showing a {}.",
    "a small photo of the {}.",
    "this is a {}.",
]
# Where `apt-get install dataset-fashion-mnist` puts the files (Debian/Ubuntu), then the name the brief guessed.
DEFAULT_ROOTS = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/dataset-fashion-mnist"))
# --root may be the folder of the idx files, or torchvision's download root (FashionMNIST/raw) or FashionMNIST/.
ROOT_CANDIDATES = (".", "raw", "FashionMNIST/raw")
PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read(path: Path, size: int) -> bytes:
    """The first `size` bytes (-1: all) of an idx file. A damaged file (truncated or corrupt gzip, a short raw file) is
    a dataset error naming the file: every image in it is suspect, so no row is skipped as "unreadable" instead."""
    try:
        with _open(path) as f:
            data = f.read(size)
    except (OSError, EOFError, zlib.error) as e:
        raise PipeError(f"damaged idx file {path}: {e} (re-download or reinstall it)") from None
    if size >= 0 and len(data) < size:
        raise PipeError(f"damaged idx file {path}: truncated, {len(data)} of {size} bytes")
    return data


def _find(root: Path, stem: str) -> Path:
    """The raw file if someone unpacked it (memory-mapped), else the .gz Debian and the upstream ship."""
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return inside(cand, root, "idx file")
    raise PipeError(f"dataset 'fashion-mnist': file not found: {root / stem}.gz")


def _header(path: Path, magic: int, dims: int) -> tuple[int, ...]:
    head = _read(path, 4 + 4 * dims)
    if struct.unpack(">i", head[:4])[0] != magic:
        raise PipeError(f"{path} is not an idx file with magic {magic}")
    return struct.unpack(f">{dims}i", head[4:])


@register_dataset("fashion-mnist")
class FashionMNIST(Dataset):
    """28x28 grey images returned as RGB. Labels are read in the constructor (60k bytes); pixels are memory-mapped
    when the idx file is uncompressed, otherwise the .gz is decompressed once on first use (47 MB for train: the
    whole set is smaller than one batch of decoded COCO images)."""

    @classmethod
    def seen_classes(cls, options: dict) -> list[str] | None:
        """Option `classes` keeps some classes: the others are unseen by a run trained on it."""
        kept = _class_list(options.get("classes"))
        return None if kept is None else [FASHION_CLASSES[c] for c in kept if 0 <= c < len(FASHION_CLASSES)]

    splits = ("train", "test")
    labelled = True

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "test",
        *,
        per_class: int | None = None,
        classes: str | list[int] | None = None,
        captions: bool = False,
    ) -> None:
        """`per_class` keeps the first N images of each class, `classes` (e.g. "0,1,2") keeps only those classes, and
        `captions` makes templated captions ("a grey picture of a trouser.") so the set can train an alignment: the
        demo's zero-shot transfer check trains on 7 classes and tests on all 10."""
        super().__init__(root, split)
        self.per_class = None if per_class is None else int_option(self.name, "per_class", per_class, 1)
        self.keep_classes = _class_list(classes)
        self.with_captions = bool_option(self.name, "captions", captions)
        if root is None:
            root = next((r for r in DEFAULT_ROOTS if r.is_dir()), None)
            if root is None:
                tried = ", ".join(map(str, DEFAULT_ROOTS))
                raise PipeError(
                    f"dataset 'fashion-mnist': no root given and none of {tried} exists "
                    "(apt-get install dataset-fashion-mnist, or pass --root)"
                )
        prefix = PREFIX[split]
        idx = f"{prefix}-images-idx3-ubyte"
        self.root = find_under(
            self.name, require_root(self.name, root), ROOT_CANDIDATES, has_files(idx, f"{idx}.gz"), f"{idx}.gz"
        )
        self.image_file = _find(self.root, f"{prefix}-images-idx3-ubyte")
        self.label_file = _find(self.root, f"{prefix}-labels-idx1-ubyte")
        n, self.rows, self.cols = _header(self.image_file, IMAGES_MAGIC, 3)
        (n_labels,) = _header(self.label_file, LABELS_MAGIC, 1)
        if n != n_labels:
            raise PipeError(f"{self.image_file} has {n} images but {self.label_file} has {n_labels} labels")
        labels = np.frombuffer(_read(self.label_file, -1)[8:], dtype=np.uint8)
        if len(labels) != n:
            raise PipeError(f"{self.label_file} is truncated: {len(labels)} of {n} labels")
        if labels.size and labels.max() >= len(FASHION_CLASSES):
            raise PipeError(f"{self.label_file} has label {labels.max()}, expected 0..{len(FASHION_CLASSES) - 1}")
        self.classes = list(FASHION_CLASSES)
        records = [ImageRecord(f"{i:05d}", int(y)) for i, y in enumerate(labels)]
        if self.keep_classes is not None:
            bad = [c for c in self.keep_classes if not 0 <= c < len(FASHION_CLASSES)]
            if bad:
                valid = f"0..{len(FASHION_CLASSES) - 1}"
                raise PipeError(f"dataset 'fashion-mnist': option classes has {bad}, valid {valid}")
            records = [r for r in records if r.label in self.keep_classes]
        if self.per_class is not None:
            seen: dict[int, int] = {}
            kept = []
            for r in records:
                seen[r.label] = seen.get(r.label, 0) + 1
                if seen[r.label] <= self.per_class:
                    kept.append(r)
            records = kept
        self._records, self.total = records, n  # ids index the whole file; `total` sizes the pixel array
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Picklable for dask workers: each process maps or decompresses the pixels itself."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_pixels")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _pixels=None)

    def _array(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                n, shape = self.total, (self.total, self.rows, self.cols)
                need = 16 + n * self.rows * self.cols
                if self.image_file.suffix != ".gz":
                    have = self.image_file.stat().st_size
                    if have < need:
                        raise PipeError(f"damaged idx file {self.image_file}: truncated, {have} of {need} bytes")
                    self._pixels = np.memmap(self.image_file, np.uint8, "r", offset=16, shape=shape)
                else:
                    raw = _read(self.image_file, -1)  # the whole stream, so that a bad CRC at its end is seen
                    if len(raw) < need:
                        raise PipeError(f"damaged idx file {self.image_file}: truncated, {len(raw)} of {need} bytes")
                    self._pixels = np.frombuffer(raw, np.uint8, offset=16, count=n * self.rows * self.cols)
                    self._pixels = self._pixels.reshape(shape)
            return self._pixels

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(np.asarray(self._array()[int(self._records[i].id)])).convert("RGB")

    def captions(self) -> list[Caption] | None:
        """With `captions`: one caption per template and image, naming the class in plain words."""
        if not self.with_captions:
            return None
        return [
            Caption(f"{r.id}#{j}", t.format(CAPTION_NAMES[r.label]), i)
            for i, r in enumerate(self._records)
            for j, t in enumerate(CAPTION_TEMPLATES)
        ]

    def templates(self) -> list[str]:
        return [
            "a photo of a {}.",
            "a black and white photo of a {}.",
            "a low resolution photo of a {}.",
            "a photo of a {}, a fashion product.",
            "a product photo of a {}.",
        ]


def _class_list(classes: str | list[int] | None) -> list[int] | None:
    if classes is None:
        return None
    try:
        items = classes.split(",") if isinstance(classes, str) else list(classes)
        return sorted({int(c) for c in items if str(c).strip() != ""})
    except (TypeError, ValueError):
        msg = f"dataset 'fashion-mnist': option classes must be class indices like 0,1,2, got {classes!r}"
        raise PipeError(msg) from None
