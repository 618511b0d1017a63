"""COCO Captions: annotations/captions_<split><year>.json and the <split><year>/ image folder (2017 or 2014).

Three names: `coco2014` and `coco2017` read one year; `coco` reads the year present (2017 first, or `-o year=`) and
writes its stores under the year's name (`<features>/coco2017/val/...`), so that the two years' val sets, which are
different images, never share a store path. Old stores under `<features>/coco/<split>/` are still evaluated.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PipeError
from .base import (
    Caption,
    CaptionFiles,
    ImageRecord,
    clean_text,
    inside,
    int_option,
    read_json,
    register_dataset,
    require_root,
    stems,
)
from .roots import find_under

YEARS = (2017, 2014)


def _find_year(name: str, root: Path, split: str, year: int | None, fixed: int | None) -> int:
    """The year whose caption file exists (2017 first), or the one asked for (by option or by reader name)."""
    if year is not None:
        year = int_option(name, "year", year)
        if year not in YEARS:
            raise PipeError(f"dataset '{name}': option year={year} is not one of {', '.join(map(str, YEARS))}")
        if fixed is not None and year != fixed:
            raise PipeError(f"dataset '{name}': option year={year} contradicts the name; use --dataset coco{year}")
        return year
    if fixed is not None:
        return fixed
    for y in YEARS:
        if (root / "annotations" / f"captions_{split}{y}.json").is_file():
            return y
    tried = " or ".join(str(root / "annotations" / f"captions_{split}{y}.json") for y in YEARS)
    raise PipeError(f"dataset '{name}': caption file not found: {tried}")


def _check_id(value: object, ann_file: Path, where: str) -> None:
    """COCO ids are integers (some exports use strings); a list, object or float is a broken file."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PipeError(f"malformed COCO captions file {ann_file}: {where} is {str(value)[:40]}, not an id")


@register_dataset("coco")
class COCOCaptions(CaptionFiles):
    """Images in the order of the json's `images` list (de-duplicated by id); captions grouped by image, in file
    order within an image, each linked to its image's index."""

    splits = ("train", "val", "test")  # test: only where someone wrote captions for it (e.g. write_world)
    fixed_year: int | None = None  # coco2014 / coco2017
    store_names = tuple(f"coco{y}" for y in YEARS)  # where `coco`'s stores go (evaluation looks there too)

    def __init__(self, root: str | Path | None, split: str = "val", *, year: int | None = None) -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        self.year = _find_year(self.name, self.root, split, year, self.fixed_year)
        self.store_name = f"coco{self.year}"
        ann_file = self.root / "annotations" / f"captions_{split}{self.year}.json"
        data = read_json(inside(ann_file, self.root, "captions file"))
        folder = f"{split}{self.year}"
        self.image_dir = find_under(
            self.name, self.root, (folder, f"images/{folder}"), lambda p: True, f"the image folder {folder}/"
        )
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise PipeError(f"malformed COCO captions file {ann_file}: no 'images' list")
        if not isinstance(data.get("annotations"), list):
            raise PipeError(f"malformed COCO captions file {ann_file}: no 'annotations' list")

        files = stems(self.image_dir)
        index: dict[object, int] = {}
        self._records: list[ImageRecord] = []
        self._paths: list[Path] = []
        for j, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
                raise PipeError(f"malformed COCO captions file {ann_file}: images[{j}] lacks 'id' or 'file_name'")
            _check_id(img["id"], ann_file, f"images[{j}].id")
            if img["id"] in index:
                continue
            stem = Path(img["file_name"]).stem
            if stem not in files:
                raise PipeError(f"{ann_file} names image '{img['file_name']}' absent from {self.image_dir}")
            index[img["id"]] = len(self._records)
            self._records.append(ImageRecord(stem))
            self._paths.append(files[stem])

        caps: list[Caption] = []
        for j, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise PipeError(f"malformed COCO captions file {ann_file}: annotations[{j}] lacks 'image_id'")
            _check_id(ann["image_id"], ann_file, f"annotations[{j}].image_id")
            cid = str(ann.get("id", j))
            item = index.get(ann["image_id"])
            if item is None:
                raise PipeError(f"{ann_file}: caption {cid} refers to image_id {ann['image_id']} not in 'images'")
            caps.append(Caption(cid, clean_text(ann.get("caption"), f"{ann_file} (caption id {cid})"), item))
        caps.sort(key=lambda c: c.item)  # stable: file order within an image
        self._captions = caps


@register_dataset("coco2014")
class COCO2014(COCOCaptions):
    """COCO 2014 (train2014 / val2014: the images of the Karpathy split and of the PAL paper's training pairs)."""

    fixed_year = 2014
    store_names = ()


@register_dataset("coco2017")
class COCO2017(COCOCaptions):
    """COCO 2017 (train2017 / val2017)."""

    fixed_year = 2017
    store_names = ()
