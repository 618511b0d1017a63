"""ImageNet (ILSVRC2012) with CLIP's 1000 class names and 80 templates, from the layouts people actually have:

- folders: <root>/<split>/<wnid>/*.JPEG (val sorted into class folders, e.g. by valprep.sh, or torchvision's ImageNet
  root after it parsed the devkit); also --root at the split folder itself;
- devkit: flat <root>/val/ILSVRC2012_val_%08d.JPEG (or ILSVRC2012_img_val/) with
  ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt} (meta.mat needs scipy);
- Kaggle: <root>/LOC_val_solution.csv with the flat images in <root>/ILSVRC/Data/CLS-LOC/val/.
Labels are positions in the sorted wnids (torchvision's), whichever layout the files come in.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from ..errors import PipeError
from .base import (
    Dataset,
    ImageRecord,
    inside,
    open_rgb,
    read_text,
    register_dataset,
    require_root,
)
from .imagefolder import class_folders, class_images, ignored
from .imagenet_classes import imagenet_classes, imagenet_templates, is_wnid

DEVKIT = Path("ILSVRC2012_devkit_t12") / "data"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_CSV, KAGGLE_IMAGES = "LOC_val_solution.csv", Path("ILSVRC") / "Data" / "CLS-LOC"
VAL_COUNT = 50000


@register_dataset("imagenet")
class ImageNet(Dataset):
    """Item ids are the file stems (ILSVRC2012_val_00000001), which are unique across the set."""

    splits = ("val", "train")
    labelled = True

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        root_dir = require_root(self.name, root)
        self.wnid_list = list(imagenet_classes())
        self.classes = list(imagenet_classes().values())
        self._label = {w: i for i, w in enumerate(self.wnid_list)}
        pairs = self._folders(root_dir) or self._devkit(root_dir) or self._kaggle(root_dir)
        if pairs is None:
            raise PipeError(
                f"dataset 'imagenet': no ImageNet layout under {root_dir}: expected {root_dir / split}/<wnid>/*.JPEG, "
                f"or {root_dir / DEVKIT / GROUND_TRUTH} with the images in {root_dir / split}/, "
                f"or {root_dir / KAGGLE_CSV} with {root_dir / KAGGLE_IMAGES / split}/"
            )
        if not pairs:
            raise PipeError(f"dataset 'imagenet': no images (.JPEG) in the {split} split under {root_dir}")
        self._paths = [p for p, _ in pairs]
        self._records = [ImageRecord(p.stem, label) for p, label in pairs]
        seen: dict[str, Path] = {}
        for p in self._paths:
            if seen.setdefault(p.stem, p) is not p:
                raise PipeError(f"dataset 'imagenet': {seen[p.stem]} and {p} share the id {p.stem} (a copied image?)")

    # -- layouts: each returns [(path, label)], or None when its files are not there ----------------------------------

    def _folders(self, root: Path) -> list[tuple[Path, int]] | None:
        """<root>/<split>/<wnid>/ (or <root> = the split folder, or Kaggle's CLS-LOC/<split>/<wnid>/)."""
        others = set(self.splits) - {self.split}  # --root at val/ is no train split
        for split_dir in (root / self.split, root / KAGGLE_IMAGES / self.split, root):
            if split_dir.name in others:
                continue
            if split_dir.is_dir() and any(is_wnid(f) for f in class_folders(split_dir)):
                break
        else:
            return None
        pairs = []
        for folder in class_folders(split_dir):
            if folder not in self._label:
                raise PipeError(
                    f"dataset 'imagenet': {split_dir / folder} is not one of the 1000 ILSVRC2012 class "
                    "folders (wnids like n01440764); use dataset 'imagefolder' for other sets"
                )
            pairs += [(p, self._label[folder]) for p in class_images(split_dir / folder)]
        return pairs

    def _flat(self, root: Path, names: dict[str, int], where: Path) -> list[tuple[Path, int]]:
        """The flat val images, listed once. Every image of the folder needs its label and every label its image: the
        devkit's ground truth labels by line number, so one lost line would silently drop the last image, or give
        every later image its neighbour's label."""
        folders = (root / self.split, root / "ILSVRC2012_img_val", root / KAGGLE_IMAGES / self.split, root)
        image_dir = next((d for d in folders if d.is_dir() and (d / f"{next(iter(names))}.JPEG").is_file()), None)
        if image_dir is None:
            tried = ", ".join(str(d) for d in folders[:3])
            raise PipeError(
                f"dataset 'imagenet': {where} lists {next(iter(names))}.JPEG but no folder holds it (tried {tried})"
            )
        files = {p.stem: p for p in image_dir.iterdir() if p.suffix == ".JPEG" and not ignored(p.name)}
        missing = next((n for n in names if n not in files), None)
        if missing is not None:
            raise PipeError(f"dataset 'imagenet': {image_dir / missing}.JPEG is missing (listed in {where})")
        if len(files) != len(names):
            raise PipeError(
                f"{where} has {len(names)} labels but {image_dir} holds {len(files)} images: the number of "
                "labels must equal the number of images (a line lost, or images added?)"
            )
        return [(files[n], label) for n, label in names.items()]

    def _devkit(self, root: Path) -> list[tuple[Path, int]] | None:
        """ILSVRC2012_validation_ground_truth.txt: line i = ILSVRC2012_ID of ILSVRC2012_val_<i>, 1..1000 in the
        devkit's own order, which meta.mat maps to wnids."""
        base = next((b for b in (root, root.parent) if (b / DEVKIT).is_dir()), None)  # root: or the val folder
        data = None if base is None else base / DEVKIT
        if data is None or not (data / GROUND_TRUTH).is_file():
            return None
        inside(data / GROUND_TRUTH, base, "ground truth file")
        if self.split != "val":
            raise PipeError(f"dataset 'imagenet': the devkit layout under {root} has only the val split")
        id_to_wnid = _devkit_wnids(inside(data / "meta.mat", base, "class table"))
        names = {}
        for i, line in enumerate(read_text(data / GROUND_TRUTH, "ground truth").split(), 1):
            wnid = id_to_wnid.get(int(line)) if line.isdigit() else None
            if wnid is None:
                raise PipeError(
                    f"{data / GROUND_TRUTH} line {i}: {line!r} is not an ILSVRC2012_ID of meta.mat (1..1000)"
                )
            names[f"ILSVRC2012_val_{i:08d}"] = self._label[wnid]
        if not names:
            raise PipeError(f"{data / GROUND_TRUTH} is empty")
        return self._flat(root, names, data / GROUND_TRUTH)

    def _kaggle(self, root: Path) -> list[tuple[Path, int]] | None:
        """LOC_val_solution.csv: ImageId, then boxes "wnid x0 y0 x1 y1 ..." whose wnids are all the image's class."""
        path = next((p for p in (root / KAGGLE_CSV, root.parent / KAGGLE_CSV) if p.is_file()), None)
        if path is None:
            return None
        inside(path, path.parent, "Kaggle solution file")
        if self.split != "val":
            raise PipeError(f"dataset 'imagenet': {path} labels only the val split")
        rows = list(csv.reader(read_text(path, "Kaggle solution file").splitlines()))
        if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
            raise PipeError(f"{path}: expected the header ImageId,PredictionString")
        names = {}
        for row in sorted(rows[1:]):
            wnid = row[1].split()[0] if len(row) == 2 and row[1].split() else None
            if wnid not in self._label:
                what = row[0] if row else "?"
                raise PipeError(f"{path}: row for {what} has no ILSVRC2012 wnid first ({row[1:]!r:.60})")
            names[row[0]] = self._label[wnid]
        return self._flat(path.parent, names, path)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def templates(self) -> list[str]:
        return imagenet_templates()


def _devkit_wnids(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 leaf synsets in meta.mat (the devkit's MATLAB file), read as torchvision
    reads it."""
    if not path.is_file():
        raise PipeError(f"dataset 'imagenet': file not found: {path} (the devkit's class table)")
    if _is_hdf5_mat(path):
        raise PipeError(
            f"{path} is a MATLAB v7.3 (HDF5) file, not the devkit's own meta.mat (MATLAB v5, which "
            "scipy reads): use the meta.mat of ILSVRC2012_devkit_t12.tar.gz, or sort the val images into "
            "val/<wnid>/ folders (valprep.sh), or the Kaggle layout (LOC_val_solution.csv)"
        )
    try:
        from scipy.io import loadmat  # optional: only this layout needs it (docs/datasets.md)
    except ImportError:
        raise PipeError(
            f"reading {path} needs scipy (pip install scipy), or sort the val images into "
            "val/<wnid>/ folders (valprep.sh) and point --root there"
        ) from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        table = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (KeyError, ValueError, TypeError, IndexError, OSError, NotImplementedError) as e:
        raise PipeError(
            f"{path} is not the devkit's meta.mat (synsets with ILSVRC2012_ID, WNID, num_children): "
            f"{type(e).__name__}: {e}"[:300]
        ) from None
    unknown = next((w for w in table.values() if w not in imagenet_classes()), None)
    if unknown is not None:
        raise PipeError(f"{path}: leaf synset {unknown} is not an ILSVRC2012 class")
    return table


# A MATLAB v7.3 file is an HDF5 file behind a 512-byte MATLAB header: version 0x0200 at bytes 124-125 (in the file's
# byte order, 'IM' or 'MI' at 126-127 says which), the HDF5 signature at byte 512. The devkit's file is v5 (0x0100).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5_mat(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(520)
    version = head[124:126] if head[126:128] == b"IM" else head[124:126][::-1]
    return version == b"\x00\x02" or head[512:520] == HDF5_SIGNATURE
