"""CIFAR-10 / CIFAR-100 replicas in the authors' python format: cifar-10-batches-py/{data_batch_1..5, test_batch,
batches.meta, readme.html} and cifar-100-python/{train, test, meta}, each a python 2 pickle (protocol 2, keys and
strings as python 2 `str`, the pixels a numpy.core.multiarray array) with every key the real files have."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

from pipe_align.extract.datasets.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES

NAMES = ("cifar10", "cifar100")
# images per file: cifar-10 has five training batches; the real files have 10000 rows each
SIZES = {"cifar10": {"train": (3, 3, 3, 3, 3), "test": (7,)}, "cifar100": {"train": (12,), "test": (8,)}}
CIFAR100_COARSE = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]


class Py2Pickler(pickle._Pickler):  # the pure-python pickler, whose opcodes can be chosen
    """Writes `bytes` as python 2 `str` (SHORT_BINSTRING/BINSTRING, read back as str with encoding='latin1') and
    numpy's globals under their python 2 module names, as cPickle wrote the real batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def pixels(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The replica's images [N, 32, 32, 3] (uint8, row-major, RGB) and labels of one split, a pure function."""
    n_classes = 10 if name == "cifar10" else 100
    n = sum(SIZES[name][split])
    rng = np.random.default_rng([len(name), split == "train"])
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, n_classes, n)
    labels[:2] = [n_classes - 1, 0]  # the ends of the label range
    return images, labels


def _rows(images: np.ndarray) -> np.ndarray:
    """The authors' row format: 1024 red values (row-major 32x32), then 1024 green, then 1024 blue."""
    return np.stack([images[:, :, :, c].reshape(len(images), 1024) for c in range(3)], axis=1).reshape(-1, 3072)


def build(root: Path, name: str) -> Path:
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            images, labels = pixels(name, split)
            start = 0
            for k, size in enumerate(SIZES[name][split], 1):
                part = slice(start, start + size)
                start += size
                label = f"training batch {k} of 5" if split == "train" else "testing batch 1 of 1"
                batch = {
                    b"batch_label": label.encode(),
                    b"labels": [int(y) for y in labels[part]],
                    b"data": _rows(images[part]),
                    b"filenames": [f"img_{split}_{i:05d}.png".encode() for i in range(part.start, part.stop)],
                }
                dump(folder / (f"data_batch_{k}" if split == "train" else "test_batch"), batch)
        dump(
            folder / "batches.meta",
            {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072},
        )
        (folder / "readme.html").write_text(
            "<meta HTTP-EQUIV='REFRESH' content='0; url=https://www.cs.toronto.edu/~kriz/cifar.html'>"
        )
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            images, labels = pixels(name, split)
            batch = {
                b"filenames": [f"img_{split}_{i:05d}.png".encode() for i in range(len(images))],
                b"batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1".encode(),
                b"fine_labels": [int(y) for y in labels],
                b"coarse_labels": [int(y) // 5 for y in labels],
                b"data": _rows(images),
            }
            dump(folder / split, batch)
        dump(
            folder / "meta",
            {
                b"fine_label_names": [c.replace(" ", "_").encode() for c in CIFAR100_CLASSES],
                b"coarse_label_names": [c.encode() for c in CIFAR100_COARSE],
            },
        )
    return root
