"""PASCAL-Context as the PAL authors evaluate it: the original release's `.mat` label maps of all 459 labels, mapped
to the 59 classes + background by name through the release's labels.txt.

Layout (--root): `trainval/<image id>.mat` (trainval.tar.gz of the Stanford release: 10,103 files, each with a
`LabelMap` of label indices), `labels.txt` ("<index>: <name>" for the 459 labels), and the VOC2010 images in `images/`
(the authors' link to VOCdevkit/VOC2010/JPEGImages) or `JPEGImages/`.

The authors' definition (shiwonkim/PAL_working, src/evaluation/zero_shot_segmentation.py, PascalContext59Dataset,
lines 561-660, with PASCAL_CONTEXT_CLASSES at lines 131-144): with no val.txt in the folder every `.mat` of trainval/
is an evaluation image; a label whose labels.txt name is one of the 59 class names becomes that class, every other
label (the other 400, and 0) becomes background, which competes in the argmax and is left out of fg_mIoU. There is
no void pixel. Class indices here follow `pascal-context` (mmsegmentation's alphabetical order) so that both readers
share prompts and per-class names; mIoU does not depend on the order.

Where the authors' code is silent on damaged input, this reader refuses instead: a `.mat` without a LabelMap, a label
that labels.txt does not list, or a labels.txt that lacks one of the 59 names is a one-line error naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import (
    Dataset,
    ImageRecord,
    image_size,
    inside,
    open_rgb,
    read_text,
    register_dataset,
    require_dir,
    require_root,
)
from .pascal_context import PASCAL_CONTEXT_CLASSES

ANNOTATIONS = "trainval"
LABELS = "labels.txt"
IMAGE_DIRS = ("images", "JPEGImages")
_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$")


def read_labels(path: Path) -> dict[int, str]:
    """labels.txt of the release: "<index>: <name>" per line, indices unique and positive (0 is left unlabelled)."""
    table: dict[int, str] = {}
    for n, line in enumerate(read_text(path, "label list").splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None or not m.group(2):
            raise PipeError(f"{path}:{n}: expected '<index>: <name>', got {line.strip()[:60]!r}")
        index = int(m.group(1))
        if index == 0 or index in table:
            raise PipeError(f"{path}:{n}: label index {index} is {'reserved' if index == 0 else 'listed twice'}")
        table[index] = m.group(2)
    if not table:
        raise PipeError(f"label list is empty: {path}")
    return table


def label_lookup(labels: dict[int, str], path: Path) -> np.ndarray:
    """Release label index -> class index of PASCAL_CONTEXT_CLASSES (0 = background for every other label); labels
    that labels.txt does not list map to -1 (refused when a label map holds one)."""
    by_name = {name: index for index, name in labels.items()}
    lookup = np.full(max(labels) + 1, -1, np.int64)
    lookup[0] = 0
    lookup[list(labels)] = 0
    for cls, name in enumerate(PASCAL_CONTEXT_CLASSES[1:], 1):
        if name not in by_name:
            raise PipeError(
                f"{path} has no label named {name!r} (one of the 59 PASCAL-Context classes): not the "
                "release's labels.txt of the 459 labels"
            )
        lookup[by_name[name]] = cls
    return lookup


@register_dataset("pascal-context-mat")
class PascalContextMat(Dataset):
    """All 10,103 trainval images of the `.mat` release (split `trainval`), 60 classes with background."""

    splits = ("trainval",)
    labelled = True
    background = 0

    def __init__(self, root: str | Path | None, split: str = "trainval") -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        ann = self.root / ANNOTATIONS
        if not ann.is_dir():
            raise PipeError(
                f"dataset '{self.name}': no {ANNOTATIONS}/ folder of .mat label maps in {self.root} "
                f"(expected {ANNOTATIONS}/, {LABELS} and images/ from trainval.tar.gz and VOC2010)"
            )
        self._lookup = label_lookup(read_labels(self.root / LABELS), self.root / LABELS)
        ids = sorted(p.stem for p in ann.glob("*.mat"))
        if not ids:
            raise PipeError(f"dataset '{self.name}': no .mat label maps in {ann}")
        images = next((self.root / d for d in IMAGE_DIRS if (self.root / d).is_dir()), None)
        if images is None:
            raise PipeError(
                f"dataset '{self.name}': no images/ (or JPEGImages/) folder in {self.root}: link "
                "VOCdevkit/VOC2010/JPEGImages there"
            )
        require_dir(images, "image")
        self._paths = [images / f"{i}.jpg" for i in ids]
        missing = next((i for i, p in zip(ids, self._paths) if not p.is_file()), None)
        if missing is not None:
            raise PipeError(
                f"dataset '{self.name}': label map {ann / (missing + '.mat')} has no image "
                f"{images / (missing + '.jpg')}"
            )
        self._mats = [ann / f"{i}.mat" for i in ids]
        self._records = [ImageRecord(i) for i in ids]
        self.classes = list(PASCAL_CONTEXT_CLASSES)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def has_masks(self) -> bool:
        return True

    def load_mask(self, i: int) -> np.ndarray:
        path = inside(self._mats[i], self._mats[i].parent, "label map")
        raw = read_label_map(path)
        w, h = image_size(self._paths[i])
        if raw.shape != (h, w):
            raise PipeError(f"label map {path} is {raw.shape[1]}x{raw.shape[0]}, its image is {w}x{h}")
        unknown = (raw < 0) | (raw >= len(self._lookup))
        mapped = self._lookup[np.where(unknown, 0, raw)]
        bad = unknown | (mapped < 0)
        if bad.any():
            value = int(raw[bad][0])
            raise PipeError(f"label map {path} holds label {value}, which {self.root / LABELS} does not list")
        return mapped.astype(np.uint8)


def read_label_map(path: Path) -> np.ndarray:
    """The `LabelMap` of one release `.mat` (MATLAB v5, read by scipy) as a 2-D integer array."""
    try:
        from scipy.io import loadmat  # optional extra `pascal-context`: only this reader needs it
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise PipeError(f"reading {path} needs scipy (pip install 'pipe-align[pascal-context]')") from None
    try:
        mat = loadmat(str(path))
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as e:
        raise PipeError(f"unreadable label map {path}: {type(e).__name__}: {e}"[:300]) from None
    raw = mat.get("LabelMap")
    if raw is None:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise PipeError(f"label map {path} has no LabelMap (variables: {keys})")
    raw = np.asarray(raw)
    if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise PipeError(f"label map {path}: LabelMap is a {raw.dtype} array of shape {raw.shape}, expected 2-D labels")
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all() or (raw != np.round(raw)).any():
            raise PipeError(f"label map {path}: LabelMap holds non-integer values")
    return raw.astype(np.int64)
