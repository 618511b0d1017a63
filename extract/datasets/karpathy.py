"""Karpathy split files (dataset_flickr30k.json, dataset_coco.json): the splits retrieval papers report on.

One json lists every image with its `split` and `sentences[].raw`; the images live in a folder beside it
(Flickr30k: flickr30k-images/; COCO: train2014/ and val2014/, named by each entry's `filepath`).
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
    read_json,
    register_dataset,
    require_root,
    stems,
)
from .roots import find_under, has_files


def relative(name: str, where: str) -> str:
    """A folder name from the json, below the image folder: an absolute path or a `..` would make the json pick which
    files on the machine are read."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise PipeError(f"{where} is {name!r}: it must be a path below the image folder (no '/' first, no '..')")
    return name


class KarpathyCaptions(CaptionFiles):
    """Images of one split in json order (de-duplicated by file), captions f"{stem}#{j}" in sentence order."""

    splits = ("train", "val", "test")
    json_name = ""
    image_dirs: tuple[str, ...] = ()  # candidates under root holding the images (entry `filepath` appended)
    merge_restval = False

    def __init__(self, root: str | Path | None, split: str = "test", *, json: str | Path | None = None) -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        self.json_file = Path(json) if json is not None else self._find_json()
        data = read_json(self.json_file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise PipeError(f"malformed Karpathy split file {self.json_file}: no 'images' list")
        wanted = {split, "restval"} if split == "train" and self.merge_restval else {split}
        image_root = self._image_root(data["images"], wanted)

        listings: dict[Path, dict[str, Path]] = {}
        seen: set[Path] = set()
        self._records: list[ImageRecord] = []
        self._paths: list[Path] = []
        self._captions: list[Caption] = []
        for j, entry in enumerate(data["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
                raise PipeError(f"malformed Karpathy split file {self.json_file}: images[{j}] lacks 'filename'")
            for key in ("split", "filepath"):
                if not isinstance(entry.get(key, ""), str):
                    raise PipeError(
                        f"malformed Karpathy split file {self.json_file}: images[{j}].{key} is "
                        f"{str(entry[key])[:40]}, not a string"
                    )
            if entry.get("split") not in wanted:
                continue
            folder = image_root / relative(entry.get("filepath", ""), f"{self.json_file} images[{j}].filepath")
            if folder not in listings:
                listings[folder] = stems(folder) if folder.is_dir() else {}
            stem = Path(entry["filename"]).stem
            path = listings[folder].get(stem)
            if path is None:
                raise PipeError(f"{self.json_file} names image '{entry['filename']}' absent from {folder}")
            if path in seen:
                continue
            seen.add(path)
            item = len(self._records)
            self._records.append(ImageRecord(stem))
            self._paths.append(path)
            sentences = entry.get("sentences")
            if not isinstance(sentences, list):
                raise PipeError(f"malformed Karpathy split file {self.json_file}: image '{stem}' has no 'sentences'")
            for k, sent in enumerate(sentences):
                cid = f"{stem}#{k}"
                raw = sent.get("raw") if isinstance(sent, dict) else None
                self._captions.append(Caption(cid, clean_text(raw, f"{self.json_file} (caption {cid})"), item))

    def _find_json(self) -> Path:
        """The split json in --root, its annotations/, or Karpathy's caption_datasets/ folder (from his release zip)."""
        folder = find_under(
            self.name, self.root, (".", "annotations", "caption_datasets"), has_files(self.json_name), self.json_name
        )
        return inside(folder / self.json_name, self.root, "split file")

    def _image_root(self, entries: list, wanted: set[str]) -> Path:
        """The folder under which each entry's `filepath`/`filename` lies: one of `image_dirs` under --root (or under
        the folder above, when --root is the caption_datasets/ folder itself). Decided by where the split's first
        image is, so a folder that exists but holds something else (root/. always exists) never wins."""
        ok = lambda e: all(isinstance(e.get(k, ""), str) for k in ("filename", "filepath", "split"))  # noqa: E731
        first = next((e for e in entries if isinstance(e, dict) and ok(e) and e.get("split") in wanted), None)
        cands = list(self.image_dirs)
        if self.json_file.parent == self.root and self.root.name == "caption_datasets":
            cands += [f"../{d}" for d in self.image_dirs]
        if first is None:  # an empty split: no image to look for
            return self.root
        where = f"{self.json_file} images[{entries.index(first)}]"
        rel = Path(relative(first.get("filepath", ""), f"{where}.filepath")) / relative(
            first["filename"], f"{where}.filename"
        )
        return find_under(
            self.name,
            self.root,
            cands,
            lambda p: (p / rel).is_file(),
            f"{rel} (the split's first image in {self.json_file.name})",
        )


@register_dataset("flickr30k")
class Flickr30k(KarpathyCaptions):
    """Flickr30k with Karpathy's 29k/1k/1k split; test is the 1k retrieval benchmark."""

    json_name = "dataset_flickr30k.json"
    # the official flickr30k-images/, other mirrors' names, Kaggle's flickr30k_images/flickr30k_images/
    image_dirs = ("flickr30k-images", "images", "flickr30k_images", "flickr30k_images/flickr30k_images")


@register_dataset("coco-karpathy")
class COCOKarpathy(KarpathyCaptions):
    """COCO with Karpathy's split (test = the 5k retrieval benchmark); train includes restval (113k), as usual."""

    splits = ("train", "val", "test", "restval")
    json_name = "dataset_coco.json"
    image_dirs = (".", "images")  # train2014/ and val2014/ in --root, or under images/ (the LAVIS/BLIP layout)
    merge_restval = True
