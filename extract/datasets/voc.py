"""PASCAL VOC 2012 segmentation: VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipe_align.extract.datasets.base import (
    Dataset,
    ImageRecord,
    image_size,
    open_rgb,
    read_id_list,
    read_index_png,
    read_name_list,
    register_dataset,
    require_root,
    stems,
)
from pipe_align.extract.errors import PipeError

# The standard VOC names (as in the devkit and mmsegmentation), index = palette index in SegmentationClass.
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

# Written by write_world (and by anyone re-using the layout for other classes): one class name per line, line i =
# palette index i. When present it replaces VOC_CLASSES.
CLASSES_FILE = "classes.txt"


def find_voc_year(root: Path) -> Path:
    """Accept the folder holding VOCdevkit, VOCdevkit itself, or VOC2012 itself (whichever the user points at)."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    for devkit in (root, root / "VOCdevkit"):
        years = sorted(p for p in devkit.glob("VOC20*") if (p / "JPEGImages").is_dir()) if devkit.is_dir() else []
        if years:
            return years[-1]
    raise PipeError(f"no VOC layout under {root} (expected VOCdevkit/VOC2012/JPEGImages)")


@register_dataset("voc")
class VOCSegmentation(Dataset):
    """Segmentation split of VOC: ids from ImageSets/Segmentation/<split>.txt, palette-index masks, 255 = void."""

    labelled = True
    background = 0  # palette index 0 is background in the VOC layout (also when classes.txt renames the classes)

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        self.root = find_voc_year(require_root(self.name, root))
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = self.root / "SegmentationClass"
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = read_id_list(split_file)
        jpgs = stems(self.image_dir, (".jpg", ".jpeg"))
        missing = next((i for i in ids if i not in jpgs), None)
        if missing is not None:
            raise PipeError(f"split file {split_file} names image '{missing}' absent from {self.image_dir}")
        self._paths = [jpgs[i] for i in ids]
        self._records = [ImageRecord(i) for i in ids]
        self._masks = self.mask_dir.is_dir()
        if self._masks:
            pngs = stems(self.mask_dir, (".png",))
            missing = next((i for i in ids if i not in pngs), None)
            if missing is not None:
                raise PipeError(f"split file {split_file} names image '{missing}' with no mask in {self.mask_dir}")
        names = self.root / CLASSES_FILE
        self.classes = read_name_list(names) if names.is_file() else list(VOC_CLASSES)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def has_masks(self) -> bool:
        return self._masks

    def load_mask(self, i: int) -> np.ndarray:
        if not self._masks:
            return super().load_mask(i)
        return read_index_png(self.mask_dir / f"{self._records[i].id}.png", image_size(self._paths[i]))
