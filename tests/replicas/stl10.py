"""STL-10 replica in the authors' binary format: stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin,
class_names.txt, fold_indices.txt. X files: uint8 images one after another, each 3 planes (R, G, B) of 96 x 96 stored
column-major (MATLAB order: byte c*9216 + x*96 + y is channel c at column x, row y); y files: one byte per image,
labels 1..10."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipe_align.extract.datasets.stl10 import STL10_CLASSES

NAMES = ("stl10",)
SIZES = {"train": 10, "test": 12, "unlabeled": 2}


def pixels(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The replica's images [N, 96, 96, 3] (uint8, row-major RGB) and labels 0..9 of one split, a pure function."""
    rng = np.random.default_rng([96, ("train", "test", "unlabeled").index(split)])
    images = rng.integers(0, 256, (SIZES[split], 96, 96, 3), dtype=np.uint8)
    labels = np.arange(SIZES[split]) % 10  # every class, 9 and 0 included
    return images, labels


def x_bytes(images: np.ndarray) -> bytes:
    """Column-major channel planes: [N, H(y), W(x), C] -> [N, C, x, y]."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def build(root: Path, name: str) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split in ("train", "test", "unlabeled"):
        images, labels = pixels(split)
        (folder / f"{split}_X.bin").write_bytes(x_bytes(images))
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("".join(f"{c}\n" for c in STL10_CLASSES))
    folds = [" ".join(str((i + k) % SIZES["train"]) for i in range(3)) for k in range(10)]
    (folder / "fold_indices.txt").write_text("".join(f"{line} \n" for line in folds))
    return root
