"""PASCAL-Context's original release as the PAL authors read it: trainval/<image id>.mat (trainval.tar.gz of
https://cs.stanford.edu/~roozbeh/pascal-context/, MATLAB v5 files holding a uint16 `LabelMap` of the 459 labels, 0
where nothing was labelled), labels.txt ("<index>: <name>", one line per label, 1..459), and the VOC2010 images linked
in as images/ (also images with no Context label map, as in VOC2010's JPEGImages).

The 59 class names sit at their indices in the real labels.txt (the table mmsegmentation's
tools/dataset_converters/pascal_context.py hard-codes as `_mapping`); the other 400 lines carry the real names where
listed below and stand-in names elsewhere, which every reader maps to background alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.replicas.voc import size_of, write_jpg

NAMES = ("pascal-context-mat",)
IDS = ("2008_000002", "2008_000003", "2008_000008", "2008_000019")
NO_LABELS = "2007_000027"  # a VOC2010 detection image: in JPEGImages, no .mat

# index in the release's labels.txt of each of the 59 classes
CLASS_INDEX = {
    "aeroplane": 2,
    "bag": 9,
    "bed": 18,
    "bedclothes": 19,
    "bench": 22,
    "bicycle": 23,
    "bird": 25,
    "boat": 31,
    "book": 33,
    "bottle": 34,
    "building": 44,
    "bus": 45,
    "cabinet": 46,
    "car": 59,
    "cat": 65,
    "ceiling": 68,
    "chair": 72,
    "cloth": 80,
    "computer": 85,
    "cow": 98,
    "cup": 104,
    "curtain": 105,
    "dog": 113,
    "door": 115,
    "fence": 144,
    "floor": 158,
    "flower": 159,
    "food": 162,
    "grass": 187,
    "ground": 189,
    "horse": 207,
    "keyboard": 220,
    "light": 232,
    "motorbike": 258,
    "mountain": 259,
    "mouse": 260,
    "person": 284,
    "plate": 295,
    "platform": 296,
    "pottedplant": 308,
    "road": 324,
    "rock": 326,
    "sheep": 347,
    "shelves": 349,
    "sidewalk": 354,
    "sign": 355,
    "sky": 360,
    "snow": 366,
    "sofa": 368,
    "table": 397,
    "track": 415,
    "train": 416,
    "tree": 420,
    "truck": 424,
    "tvmonitor": 427,
    "wall": 440,
    "water": 445,
    "window": 454,
    "wood": 458,
}
OTHER_NAMES = {1: "accordion", 3: "air conditioner", 4: "antenna", 8: "baby carriage", 10: "ball", 17: "bathtub"}
LABEL_COUNT = 459


def labels_txt() -> str:
    names = {**OTHER_NAMES, **{i: n for n, i in CLASS_INDEX.items()}}
    return "".join(f"{i}: {names.get(i, f'unlisted label {i}')}\n" for i in range(1, LABEL_COUNT + 1))


def raw_label_map(seed: int, size: tuple[int, int]) -> np.ndarray:
    """Rectangles of the 59 classes' labels, of other labels and of 0 (unlabelled) on a random other label."""
    rng = np.random.default_rng(2000 + seed)
    w, h = size
    pool = [*CLASS_INDEX.values(), *OTHER_NAMES, 0, 77, LABEL_COUNT]
    mask = np.full((h, w), int(rng.choice([1, 77, 300])), np.uint16)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w - 3)), int(rng.integers(0, h - 3))
        x1, y1 = int(rng.integers(x0 + 2, w + 1)), int(rng.integers(y0 + 2, h + 1))
        mask[y0:y1, x0:x1] = int(rng.choice(pool))
    return mask


def write_mat(path: Path, label_map: np.ndarray) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"LabelMap": label_map})


def build(root: Path, name: str = "pascal-context-mat") -> Path:
    top = Path(root) / "pascal-context"
    jpegs = Path(root) / "VOCdevkit" / "VOC2010" / "JPEGImages"
    for seed, i in enumerate(IDS):
        write_jpg(jpegs / f"{i}.jpg", seed, size_of(seed))
        write_mat(top / "trainval" / f"{i}.mat", raw_label_map(seed, size_of(seed)))
    write_jpg(jpegs / f"{NO_LABELS}.jpg", 7, (40, 30))
    (top / "labels.txt").write_text(labels_txt())
    (top / "images").symlink_to(jpegs.resolve(), target_is_directory=True)
    return top
