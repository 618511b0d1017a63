"""ADE20K SceneParsing (ADEChallengeData2016): images/{training,validation}/*.jpg, annotations/.../*.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import (
    Dataset,
    ImageRecord,
    image_size,
    mask_file,
    open_rgb,
    read_index_png,
    register_dataset,
    require_dir,
    require_root,
    stems,
)
from .roots import find_under, has_all

# objectInfo150 names as mmsegmentation spells them; index 0 = "other" (unlabelled), ignored by the evaluation
# (mmseg's reduce_zero_label). Masks are returned raw: 0..150.
ADE20K_CLASSES = ["other"] + [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]

# --root may be ADEChallengeData2016 itself, the folder it was unzipped into, a folder named after it holding the
# unzipped one, or mmsegmentation's data/ (data/ade/ADEChallengeData2016).
ROOT_CANDIDATES = (".", "ADEChallengeData2016", "ADEChallengeData2016/ADEChallengeData2016", "ade/ADEChallengeData2016")
SPLIT_FOLDERS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


@register_dataset("ade20k")
class ADE20K(Dataset):
    """All images of the split folder, sorted by name; every image must have its annotation PNG."""

    splits = tuple(SPLIT_FOLDERS)
    labelled = True
    reduce_zero_label = True  # 0 = "other": unlabelled pixels, ignored by every protocol (mmseg's ADE20K convention)

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        folder = SPLIT_FOLDERS[split]
        self.root = find_under(
            self.name,
            require_root(self.name, root),
            ROOT_CANDIDATES,
            has_all("images", "annotations"),
            "ADEChallengeData2016's images/ and annotations/",
        )
        self.image_dir = require_dir(self.root / "images" / folder, f"dataset '{self.name}': image")
        self.mask_dir = require_dir(self.root / "annotations" / folder, f"dataset '{self.name}': annotation")
        jpgs = stems(self.image_dir, (".jpg", ".jpeg"))
        if not jpgs:
            raise PipeError(f"dataset '{self.name}': no .jpg images in {self.image_dir}")
        pngs = stems(self.mask_dir, (".png",))
        missing = next((s for s in jpgs if s not in pngs), None)
        if missing is not None:
            raise PipeError(f"image '{missing}' in {self.image_dir} has no annotation {missing}.png in {self.mask_dir}")
        self._records = [ImageRecord(s) for s in jpgs]
        self._paths = list(jpgs.values())
        self.classes = list(ADE20K_CLASSES)

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def has_masks(self) -> bool:
        return True

    def load_mask(self, i: int) -> np.ndarray:
        return read_index_png(mask_file(self.mask_dir / f"{self._records[i].id}.png"), image_size(self._paths[i]))
