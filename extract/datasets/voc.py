"""PASCAL VOC 2012 segmentation: VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}, plus the
SBD-augmented training split (`trainaug`: ImageSets/Segmentation/trainaug.txt, masks in SegmentationClassAug/) and
the `test` split (images only: its masks are not public)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import (
    Dataset,
    ImageRecord,
    image_size,
    inside,
    mask_file,
    open_rgb,
    read_id_list,
    read_index_png,
    read_name_list,
    register_dataset,
    require_root,
    stems,
)
from .roots import find_under, has_all

# The standard VOC names (as in the devkit and mmsegmentation), index = palette index in SegmentationClass.
VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# Written by write_world (and by anyone re-using the layout for other classes): one class name per line, line i =
# palette index i. When present it replaces VOC_CLASSES.
CLASSES_FILE = "classes.txt"
# Split -> mask folder. trainaug: the 10,582 SBD-augmented training ids, grey index PNGs in SegmentationClassAug
# (the DeepLab layout); test: images only, whatever mask folders exist.
MASK_DIRS = {
    "train": "SegmentationClass",
    "val": "SegmentationClass",
    "trainval": "SegmentationClass",
    "trainaug": "SegmentationClassAug",
    "test": None,
}


def find_year(name: str, root: Path, year: str, sets: str) -> Path:
    """The VOC<year> folder: --root may be it, the VOCdevkit above it, or the folder holding VOCdevkit."""
    return find_under(
        name,
        root,
        (".", year, f"VOCdevkit/{year}"),
        has_all("JPEGImages", f"ImageSets/{sets}"),
        f"the VOC layout ({year}: JPEGImages/ and ImageSets/{sets}/)",
    )


def read_split(root: Path, split_file: Path) -> tuple[list[str], list[Path]]:
    """Ids of a split file and their JPEGs."""
    ids = read_id_list(inside(split_file, root, "split file"))
    jpgs = stems(root / "JPEGImages", (".jpg", ".jpeg"))
    missing = next((i for i in ids if i not in jpgs), None)
    if missing is not None:
        raise PipeError(f"split file {split_file} names image '{missing}' absent from {root / 'JPEGImages'}")
    return ids, [jpgs[i] for i in ids]


def mask_files(name: str, ids: list[str], split_file: Path, mask_dir: Path) -> list[Path]:
    """Every id's <id>.png in `mask_dir`, or a one-line error naming the first id without one."""
    if not mask_dir.is_dir():
        raise PipeError(f"dataset '{name}': mask folder not found: {mask_dir} (split file {split_file})")
    pngs = stems(mask_dir, (".png",))
    missing = next((i for i in ids if i not in pngs), None)
    if missing is not None:
        raise PipeError(f"split file {split_file} names image '{missing}' with no mask in {mask_dir}")
    return [pngs[i] for i in ids]


def aug_masks(name: str, root: Path, ids: list[str], split_file: Path) -> list[Path]:
    """trainaug masks: SegmentationClassAug/<id>.png (SBD's, grey indices), else the official palette mask. The DeepLab
    zip holds all 10,582; mmseg's voc_aug.py converts SBD's only, and its config reads VOC-train ids that SBD lacks
    from SegmentationClass: so does this."""
    aug, official = root / "SegmentationClassAug", root / "SegmentationClass"
    if not aug.is_dir():
        raise PipeError(f"dataset '{name}': mask folder not found: {aug} (split file {split_file})")
    found = stems(aug, (".png",))
    extra = stems(official, (".png",)) if official.is_dir() else {}
    missing = next((i for i in ids if i not in found and i not in extra), None)
    if missing is not None:
        raise PipeError(f"split file {split_file} names image '{missing}' with no mask in {aug} or {official}")
    return [found.get(i) or extra[i] for i in ids]


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
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids, self._paths = read_split(self.root, split_file)
        self._records = [ImageRecord(i) for i in ids]
        self._mask_paths: list[Path] | None = None  # official masks are optional for train/val (prompts, captions)
        if folder == "SegmentationClassAug":
            self._mask_paths = aug_masks(self.name, self.root, ids, split_file)
        elif folder is not None and (self.root / folder).is_dir():
            self._mask_paths = mask_files(self.name, ids, split_file, self.root / folder)
        names = self.root / CLASSES_FILE
        self.classes = read_name_list(inside(names, self.root, "class list")) if names.is_file() else list(VOC_CLASSES)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def has_masks(self) -> bool:
        return self._mask_paths is not None

    def load_mask(self, i: int) -> np.ndarray:
        if self._mask_paths is None:
            if self.split == "test":
                raise PipeError("dataset 'voc': the test split has no public masks (evaluate it on the VOC server)")
            return super().load_mask(i)
        return read_index_png(mask_file(self._mask_paths[i]), image_size(self._paths[i]))
