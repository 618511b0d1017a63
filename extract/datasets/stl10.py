"""STL-10 from the authors' binary distribution (stl10_binary/), read the way torchvision reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import (
    Dataset,
    ImageRecord,
    inside,
    read_name_list,
    register_dataset,
    require_root,
)

# CLIP's names and templates for STL10 (openai/CLIP data/prompts.md; clip_benchmark uses the same two templates and
# torchvision's names, which are these: the authors' class_names.txt).
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_TEMPLATES = ["a photo of a {}.", "a photo of the {}."]
FOLDER, ARCHIVE = "stl10_binary", "stl10_binary.tar.gz"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE


@register_dataset("stl10")
class STL10(Dataset):
    """<split>_X.bin holds uint8 images of 3 x 96 x 96, each channel plane column-major; <split>_y.bin one label
    byte per image, 1..10. The image file is memory-mapped, never read whole. The unlabeled split (100k images, no
    labels) is not offered: it has no use for zero-shot classification."""

    splits = ("train", "test")
    labelled = True

    def __init__(self, root: str | Path | None, split: str = "test") -> None:
        super().__init__(root, split)
        self.dir = _locate(require_root(self.name, root))
        self.image_file, label_file = self.dir / f"{split}_X.bin", self.dir / f"{split}_y.bin"
        for path in (self.image_file, label_file):
            if not path.is_file():
                raise PipeError(f"dataset 'stl10': file not found: {path}")
            inside(path, self.dir, "data file")
        size = self.image_file.stat().st_size
        if size % IMAGE_BYTES:
            raise PipeError(f"damaged {self.image_file}: {size} bytes is not a whole number of 3x96x96 images")
        labels = np.fromfile(label_file, dtype=np.uint8).astype(np.int64) - 1
        if len(labels) != size // IMAGE_BYTES:
            raise PipeError(f"{self.image_file} has {size // IMAGE_BYTES} images but {label_file} {len(labels)} labels")
        names_file = self.dir / "class_names.txt"
        self.classes = list(STL10_CLASSES)  # the authors' class_names.txt holds the same names
        if names_file.is_file():
            self.classes = read_name_list(inside(names_file, self.dir, "class list"))
        bad = next((int(y) + 1 for y in labels if not 0 <= y < len(self.classes)), None)
        if bad is not None:
            raise PipeError(f"{label_file} has label {bad}, expected 1..{len(self.classes)}")
        self._records = [ImageRecord(f"{i:05d}", int(y)) for i, y in enumerate(labels)]  # torchvision's index
        self._pixels: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_pixels"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pixels=None)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        if self._pixels is None:  # a memory map: opening it twice from two threads is harmless
            self._pixels = np.memmap(self.image_file, np.uint8, "r", shape=(len(self._records), 3, SIDE, SIDE))
        plane = np.asarray(self._pixels[int(self._records[i].id)])  # [c][x][y]: column-major planes
        return Image.fromarray(np.ascontiguousarray(plane.transpose(2, 1, 0)), "RGB")

    def templates(self) -> list[str]:
        return list(STL10_TEMPLATES)


def _locate(root: Path) -> Path:
    """root is stl10_binary/ or the folder holding it (torchvision's root); else one line saying what was expected."""
    for cand in (root, root / FOLDER):
        if (cand / "test_X.bin").is_file() or (cand / "train_X.bin").is_file():
            return cand
    if (root / ARCHIVE).is_file():
        raise PipeError(
            f"dataset 'stl10': {root / ARCHIVE} is still packed; unpack it there (tar xzf {ARCHIVE}) so "
            f"that {root / FOLDER} exists"
        )
    raise PipeError(
        f"dataset 'stl10': expected {root / FOLDER}/test_X.bin (--root is the folder holding {FOLDER}/, "
        "or that folder itself)"
    )
