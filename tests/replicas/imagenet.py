"""ImageNet (ILSVRC2012) val replicas in the layouts people have:
- `build` (reader `imagenet`): val/<wnid>/ILSVRC2012_val_%08d.JPEG, as valprep.sh or torchvision leave them;
- `build_devkit`: the flat val/ILSVRC2012_val_%08d.JPEG of ILSVRC2012_img_val.tar beside ILSVRC2012_devkit_t12/data/
  {meta.mat, ILSVRC2012_validation_ground_truth.txt} (needs scipy to write the MATLAB file);
- `build_kaggle`: LOC_val_solution.csv, LOC_synset_mapping.txt and ILSVRC/Data/CLS-LOC/val/*.JPEG.
Images are JPEGs as in the real set: mostly RGB, one grayscale (mode L) and one CMYK file, upper-case .JPEG, sizes
that differ. meta.mat holds the 1000 leaf synsets plus two inner ones (num_children > 0), with ILSVRC2012_IDs in an
order that is not the sorted-wnid order (as in the real file, whose order the reader never assumes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipe_align.extract.datasets.imagenet_classes import imagenet_classes

NAMES = ("imagenet",)
# (wnid, mode, colour) of ILSVRC2012_val_00000001.. : first and last class, and two in between
ITEMS = [
    ("n01440764", "RGB", (200, 30, 30)),
    ("n15075141", "L", (77,)),
    ("n02119789", "CMYK", (0, 255, 255, 0)),
    ("n01440764", "RGB", (20, 180, 40)),
    ("n04590129", "RGB", (10, 10, 220)),
    ("n02119789", "RGB", (250, 250, 0)),
]


def stem(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}"


def _jpeg(path: Path, i: int) -> None:
    _, mode, colour = ITEMS[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (40 + 4 * i, 30 + 2 * i), colour).save(path, "JPEG", quality=100)


def devkit_ids() -> dict[str, int]:
    """wnid -> ILSVRC2012_ID of this replica's meta.mat: a fixed shuffle of 1..1000."""
    wnids = list(imagenet_classes())
    order = np.random.default_rng(2012).permutation(len(wnids))
    return {wnids[k]: i + 1 for i, k in enumerate(order)}


def build(root: Path, name: str = "imagenet") -> Path:
    for i, (wnid, _, _) in enumerate(ITEMS):
        _jpeg(root / "val" / wnid / f"{stem(i)}.JPEG", i)
    return root


def build_devkit(root: Path) -> Path:
    from scipy.io import savemat  # only this layout's writer needs scipy

    for i in range(len(ITEMS)):
        _jpeg(root / "val" / f"{stem(i)}.JPEG", i)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids, names = devkit_ids(), imagenet_classes()
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w, _, _ in ITEMS))
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [
        (float(ids[w]), w, names[w], f"gloss of {names[w]}", 0.0, np.zeros((1, 0)), 0.0, 1300.0)
        for w in sorted(ids, key=ids.get)
    ]
    rows += [
        (1001.0, "n00001740", "entity", "that which is perceived", 1.0, np.array([[1002.0]]), 19.0, 0.0),
        (1002.0, "n00021939", "artifact", "a man-made object", 1.0, np.array([[1.0]]), 18.0, 0.0),
    ]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    savemat(data / "meta.mat", {"synsets": synsets})
    return root


def build_kaggle(root: Path) -> Path:
    images = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    lines = ["ImageId,PredictionString"]
    for i, (wnid, _, _) in enumerate(ITEMS):
        _jpeg(images / f"{stem(i)}.JPEG", i)
        lines.append(f"{stem(i)},{wnid} 1 2 30 20 {wnid} 3 4 20 25 ")
    (root / "LOC_val_solution.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # any order
    names = imagenet_classes()
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {names[w]}\n" for w in names))
    return root
