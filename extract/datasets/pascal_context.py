"""PASCAL-Context as mmsegmentation prepares it: VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext/*.png,
ImageSets/SegmentationContext/{train,val}.txt}, the masks written by mmseg's
tools/dataset_converters/pascal_context.py (grey PNGs, 0 = background, 1..59 = the 59 classes in alphabetical order).

Two readers over the same files, as mmsegmentation has two datasets:
- `pascal-context`: 60 classes, background (0) is a class (mmseg's PascalContextDataset, reduce_zero_label=False);
- `pascal-context-59`: the 59 classes, label 0 ignored (mmseg's PascalContextDataset59, reduce_zero_label=True).
Masks are returned raw (0..59, 255 void) by both; the label-space attributes say how they are scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import (
    Dataset,
    ImageRecord,
    image_size,
    mask_file,
    open_rgb,
    read_index_png,
    register_dataset,
    require_root,
)
from .voc import find_year, mask_files, read_split

# mmsegmentation's PascalContextDataset class names (mask value = index); PascalContextDataset59 is [1:].
PASCAL_CONTEXT_CLASSES = [
    "background",
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "pottedplant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tvmonitor",
    "wall",
    "water",
    "window",
    "wood",
]
MASK_DIR = "SegmentationClassContext"
SETS_DIR = "SegmentationContext"


@register_dataset("pascal-context")
class PascalContext(Dataset):
    """Ids from ImageSets/SegmentationContext/<split>.txt (train 4,996, val 5,104), their masks required."""

    splits = ("train", "val")
    labelled = True
    background = 0  # 60-class protocol: background competes and is left out of fg_mIoU

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        self.root = find_year(self.name, require_root(self.name, root), "VOC2010", SETS_DIR)
        split_file = self.root / "ImageSets" / SETS_DIR / f"{split}.txt"
        ids, self._paths = read_split(self.root, split_file)
        self._masks = mask_files(self.name, ids, split_file, self.root / MASK_DIR)
        self._records = [ImageRecord(i) for i in ids]
        self.classes = list(PASCAL_CONTEXT_CLASSES)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def has_masks(self) -> bool:
        return True

    def load_mask(self, i: int) -> np.ndarray:
        return read_index_png(mask_file(self._masks[i]), image_size(self._paths[i]))


@register_dataset("pascal-context-59")
class PascalContext59(PascalContext):
    """The same files; label 0 (background) is ignored and the 59 classes compete (class 0 keeps its name so that
    class index = mask value, as for ADE20K's "other")."""

    background = None
    reduce_zero_label = True
