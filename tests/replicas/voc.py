"""PASCAL VOC 2012 with the SBD augmentation, as the devkit tar, VOC2012test.tar and the DeepLab
SegmentationClassAug zip unpack: VOCdevkit/VOC2012/{JPEGImages/*.jpg (RGB, grayscale and CMYK JPEGs),
SegmentationClass/*.png (palette PNGs, 255 on object borders), SegmentationClassAug/*.png (grey index PNGs),
ImageSets/Segmentation/{train,val,trainval,trainaug,test}.txt}. The test images have no masks, as in the real
release. Also the shared writers of the other segmentation replicas (pascal_context, ade20k)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipe_align.extract.datasets.base import voc_palette

NAMES = ("voc",)
TRAIN = ("2007_000032", "2007_000039")
VAL = ("2007_000033", "2007_000042")
SBD_ONLY = ("2008_000002", "2008_000003")  # trainaug ids with no official mask
TEST = ("2008_000001", "2008_000004")
MODES = ("RGB", "L", "CMYK")  # JPEG colour modes found in the real sets (CMYK: a few ImageNet/COCO files)


def write_jpg(path: Path, seed: int, size: tuple[int, int]) -> None:
    """A noisy JPEG in one of MODES (by seed), so decoding and colour conversion are exercised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    mode = MODES[seed % len(MODES)]
    (rgb if mode == "RGB" else rgb.convert(mode)).save(path, quality=90)


def label_map(seed: int, size: tuple[int, int], labels: int, void_border: bool) -> np.ndarray:
    """A few rectangles of random classes on label 0; with `void_border`, 255 on every rectangle's outline (as the
    VOC annotators drew object borders)."""
    rng = np.random.default_rng(1000 + seed)
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = int(rng.integers(x0 + 3, w + 1)), int(rng.integers(y0 + 3, h + 1))
        mask[y0:y1, x0:x1] = int(rng.integers(1, labels))
        if void_border:
            mask[y0, x0:x1] = mask[y1 - 1, x0:x1] = mask[y0:y1, x0] = mask[y0:y1, x1 - 1] = 255
    return mask


def palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask, "P")
    img.putpalette(voc_palette())
    img.save(path)


def grey_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, "L").save(path)


def size_of(seed: int) -> tuple[int, int]:
    return (40, 30) if seed % 2 == 0 else (30, 36)  # landscape and portrait, like the real 500x375 / 375x500


def build(root: Path, name: str = "voc") -> Path:
    year = Path(root) / "VOCdevkit" / "VOC2012"
    ids = TRAIN + VAL + SBD_ONLY + TEST
    for seed, i in enumerate(ids):
        write_jpg(year / "JPEGImages" / f"{i}.jpg", seed, size_of(seed))
        if i in TRAIN + VAL:
            palette_png(year / "SegmentationClass" / f"{i}.png", label_map(seed, size_of(seed), 21, True))
        if i not in TEST:  # SBD-converted masks carry no void borders; the VOC-origin ones keep theirs
            grey_png(year / "SegmentationClassAug" / f"{i}.png", label_map(seed, size_of(seed), 21, i in TRAIN + VAL))
    write_jpg(year / "JPEGImages" / "2007_000027.jpg", 99, (40, 30))  # a detection-only image in no split
    sets = year / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    lists = {"train": TRAIN, "val": VAL, "trainval": TRAIN + VAL, "trainaug": TRAIN + SBD_ONLY, "test": TEST}
    for split, members in lists.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in members))
    return Path(root)
