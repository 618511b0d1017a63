"""PASCAL VOC 2012 segmentation: VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}, plus the
SBD-augmented training split (`trainaug`: ImageSets/Segmentation/trainaug.txt, masks in SegmentationClassAug/) and
the `test` split (images only: its masks are not public)."""

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
from pipe_align.extract.datasets.roots import find_under, has_all
from pipe_align.extract.errors import PipeError

# The standard VOC names (as in the devkit and mmsegmentation), index = palette index in SegmentationClass.
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

# Written by write_world (and by anyone re-using the layout for other classes): one class name per line, line i =
# palette index i. When present it replaces VOC_CLASSES.
CLASSES_FILE = "classes.txt"
# Split -> mask folder. trainaug: the 10,582 SBD-augmented training ids, grey index PNGs in SegmentationClassAug
# (the DeepLab layout); test: images only, whatever mask folders exist.
MASK_DIRS = {"train": "SegmentationClass", "val": "SegmentationClass", "trainval": "SegmentationClass",
             "trainaug": "SegmentationClassAug", "test": None}  # fmt: skip


def find_year(name: str, root: Path, year: str, sets: str) -> Path:
    """The VOC<year> folder: --root may be it, the VOCdevkit above it, or the folder holding VOCdevkit."""
    return find_under(name, root, (".", year, f"VOCdevkit/{year}"), has_all("JPEGImages", f"ImageSets/{sets}"),
                      f"the VOC layout ({year}: JPEGImages/ and ImageSets/{sets}/)")  # fmt: skip


def read_split(name: str, root: Path, split_file: Path, mask_dir: Path | None) -> tuple[list[str], list[Path]]:
    """Ids of a split file, their JPEGs, and (when `mask_dir` is given) a check that every id has its mask."""
    ids = read_id_list(split_file)
    jpgs = stems(root / "JPEGImages", (".jpg", ".jpeg"))
    missing = next((i for i in ids if i not in jpgs), None)
    if missing is not None:
        raise PipeError(f"split file {split_file} names image '{missing}' absent from {root / 'JPEGImages'}")
    if mask_dir is not None:
        if not mask_dir.is_dir():
            raise PipeError(f"dataset '{name}': mask folder not found: {mask_dir} (split file {split_file})")
        pngs = stems(mask_dir, (".png",))
        missing = next((i for i in ids if i not in pngs), None)
        if missing is not None:
            raise PipeError(f"split file {split_file} names image '{missing}' with no mask in {mask_dir}")
    return ids, [jpgs[i] for i in ids]


@register_dataset("voc")
class VOCSegmentation(Dataset):
    """Segmentation split of VOC: ids from ImageSets/Segmentation/<split>.txt, palette-index masks, 255 = void."""

    labelled = True
    background = 0  # palette index 0 is background in the VOC layout (also when classes.txt renames the classes)

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        self.root = find_year(self.name, require_root(self.name, root), "VOC2012", "Segmentation")
        self.image_dir = self.root / "JPEGImages"
        folder = MASK_DIRS.get(split, "SegmentationClass")  # other split files (a user's own) use the official masks
        self.mask_dir = self.root / folder if folder else None
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        # official masks are optional for train/val (captions or prompts alone); the Aug masks are what trainaug is
        need = split == "trainaug" or (self.mask_dir is not None and self.mask_dir.is_dir())
        ids, self._paths = read_split(self.name, self.root, split_file, self.mask_dir if need else None)
        self._masks = need
        self._records = [ImageRecord(i) for i in ids]
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
            if self.split == "test":
                raise PipeError("dataset 'voc': the test split has no public masks (evaluate it on the VOC server)")
            return super().load_mask(i)
        return read_index_png(self.mask_dir / f"{self._records[i].id}.png", image_size(self._paths[i]))
