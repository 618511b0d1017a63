"""Fashion-MNIST from its idx files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]), as Debian ships them."""

from __future__ import annotations

import gzip
import struct
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from extract.datasets.base import Dataset, ImageRecord, UnreadableImage, register_dataset, require_root
from extract.errors import PipeError

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Where `apt-get install dataset-fashion-mnist` puts the files (Debian/Ubuntu), then the name the brief guessed.
DEFAULT_ROOTS = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/dataset-fashion-mnist"))
PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path:
    """The raw file if someone unpacked it (memory-mapped), else the .gz Debian and the upstream ship."""
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise PipeError(f"dataset 'fashion-mnist': file not found: {root / stem}.gz")


def _header(path: Path, magic: int, dims: int) -> tuple[int, ...]:
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * dims)
    except (OSError, EOFError) as e:
        raise PipeError(f"unreadable idx file {path}: {e}") from None
    if len(head) < 4 + 4 * dims or struct.unpack(">i", head[:4])[0] != magic:
        raise PipeError(f"{path} is not an idx file with magic {magic}")
    return struct.unpack(f">{dims}i", head[4:])


@register_dataset("fashion-mnist")
class FashionMNIST(Dataset):
    """28x28 grey images returned as RGB. Labels are read in the constructor (60k bytes); pixels are memory-mapped
    when the idx file is uncompressed, otherwise the .gz is decompressed once on first use (47 MB for train: the
    whole set is smaller than one batch of decoded COCO images)."""

    splits = ("train", "test")

    def __init__(self, root: str | Path | None = None, split: str = "test") -> None:
        super().__init__(root, split)
        if root is None:
            root = next((r for r in DEFAULT_ROOTS if r.is_dir()), None)
            if root is None:
                tried = ", ".join(map(str, DEFAULT_ROOTS))
                raise PipeError(
                    f"dataset 'fashion-mnist': no root given and none of {tried} exists "
                    "(apt-get install dataset-fashion-mnist, or pass --root)"
                )
        self.root = require_root(self.name, root)
        prefix = PREFIX[split]
        self.image_file = _find(self.root, f"{prefix}-images-idx3-ubyte")
        self.label_file = _find(self.root, f"{prefix}-labels-idx1-ubyte")
        n, self.rows, self.cols = _header(self.image_file, IMAGES_MAGIC, 3)
        (n_labels,) = _header(self.label_file, LABELS_MAGIC, 1)
        if n != n_labels:
            raise PipeError(f"{self.image_file} has {n} images but {self.label_file} has {n_labels} labels")
        with _open(self.label_file) as f:
            labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
        if len(labels) != n:
            raise PipeError(f"{self.label_file} is truncated: {len(labels)} of {n} labels")
        if labels.size and labels.max() >= len(FASHION_CLASSES):
            raise PipeError(f"{self.label_file} has label {labels.max()}, expected 0..{len(FASHION_CLASSES) - 1}")
        self.classes = list(FASHION_CLASSES)
        self._records = [ImageRecord(f"{i:05d}", int(y)) for i, y in enumerate(labels)]
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
                n, shape = len(self._records), (len(self._records), self.rows, self.cols)
                if self.image_file.suffix != ".gz":
                    if self.image_file.stat().st_size < 16 + n * self.rows * self.cols:
                        raise UnreadableImage(f"{self.image_file} is truncated")
                    self._pixels = np.memmap(self.image_file, np.uint8, "r", offset=16, shape=shape)
                else:
                    with gzip.open(self.image_file, "rb") as f:
                        raw = f.read()
                    if len(raw) < 16 + n * self.rows * self.cols:
                        raise UnreadableImage(f"{self.image_file} is truncated")
                    self._pixels = np.frombuffer(raw, np.uint8, offset=16, count=n * self.rows * self.cols)
                    self._pixels = self._pixels.reshape(shape)
            return self._pixels

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(np.asarray(self._array()[i])).convert("RGB")

    def templates(self) -> list[str]:
        return [
            "a photo of a {}.",
            "a black and white photo of a {}.",
            "a low resolution photo of a {}.",
            "a photo of a {}, a fashion product.",
            "a product photo of a {}.",
        ]
