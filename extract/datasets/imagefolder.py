"""torchvision-style ImageFolder: root/<split>/<class>/**/<image>; class index = position among the sorted folders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from ..errors import PipeError
from .base import (
    IMAGE_SUFFIXES,
    Caption,
    Dataset,
    ImageRecord,
    inside,
    open_rgb,
    read_text,
    register_dataset,
    require_root,
)
from .imagenet_classes import imagenet_classes, imagenet_templates
from .pairs import string_option
from .tables import group_rows, read_table, require_columns

CLASSES_FILE = "classes.txt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder: image-caption pairs
METADATA_IMAGE_KEY = "file_name"
SUFFIXES = (*IMAGE_SUFFIXES, ".tif", ".tiff")


def ignored(name: str) -> bool:
    """Hidden files and folders, macOS's AppleDouble `._x.jpg` companions and `__MACOSX` folders from zip files:
    never data, so never rows (a `._x.jpg` is not a JPEG and would be skipped as unreadable)."""
    return name.startswith(".") or name == "__MACOSX"


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not ignored(p.name))


def class_images(folder: Path) -> list[Path]:
    """Image files under a class folder, sub-folders included (sorted by relative path; hidden entries skipped)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.suffix.lower() in SUFFIXES and not any(ignored(part) for part in rel) and p.is_file():
            out.append(p)
    return out


def read_classes_file(path: Path, folders: list[str]) -> tuple[list[str], list[str]]:
    """(label-order keys, names) from a classes file. Two forms: one class folder per line (names = folders), or
    `<folder> <name>` per line (the rest of the line is the name, e.g. `n01440764 tench` or LOC_synset_mapping.txt).
    A file with a line that is exactly a class folder's name is of the first form."""
    lines = [line.strip() for line in read_text(path, "class list").splitlines() if line.strip()]
    if not lines:
        raise PipeError(f"class list is empty: {path}")
    present = set(folders)
    if any(line in present for line in lines) or not all(len(line.split(maxsplit=1)) == 2 for line in lines):
        return lines, lines
    keys = [line.split(maxsplit=1)[0] for line in lines]
    dup = next((k for k, n in Counter(keys).items() if n > 1), None)
    if dup is not None:
        raise PipeError(f"class list {path} lists the folder '{dup}' twice")
    return keys, [" ".join(line.split(maxsplit=1)[1].split()) for line in lines]


@register_dataset("imagefolder")
class ImageFolder(Dataset):
    """Classes are the sorted sub-folders of root/<split>, unless root/classes.txt fixes them (in label order): use
    it when a split lacks some class folder, or labels would shift between splits, or to give the folders real
    names (`<folder> <name>` per line). Folders named by ImageNet wnids get CLIP's ImageNet names by themselves.
    Item ids are "<class>/<path below it, without suffix>", since stems alone may repeat across folders.

    A split folder with a `metadata.jsonl` or `metadata.csv` (Hugging Face's imagefolder convention) is image-caption
    pairs instead: `file_name` + a text column (`-o caption_key=`, default `text`), no classes."""

    labelled = True

    def __init__(self, root: str | Path | None, split: str = "val", *, caption_key: str | None = None) -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        split_dir = self.root / split
        if not split_dir.is_dir() and self.root.name == split:  # --root given as the split folder itself
            split_dir, self.root = self.root, self.root.parent
        if not split_dir.is_dir():
            raise PipeError(
                f"dataset '{self.name}': split folder not found: {split_dir} (expected <root>/{split}/<class>/<images>)"
            )
        self._captions: list[Caption] | None = None
        if self._read_metadata(split_dir, caption_key):
            return
        folders = class_folders(split_dir)
        if not folders:
            raise PipeError(f"dataset '{self.name}': no class folders in {split_dir} (expected {split_dir}/<class>/)")
        names_file = self.root / CLASSES_FILE
        self.imagenet = False  # wnid folders named by CLIP: CLIP's 80 ImageNet templates too
        if names_file.is_file():
            keys, self.classes = read_classes_file(inside(names_file, self.root, "class list"), folders)
            extra = next((f for f in folders if f not in keys), None)
            if extra is not None:
                raise PipeError(f"class folder '{extra}' in {split_dir} is not listed in {names_file}")
        else:
            keys, wnids = folders, imagenet_classes()
            self.imagenet = all(f in wnids for f in folders)
            self.classes = [wnids[f] for f in folders] if self.imagenet else folders
        self._records: list[ImageRecord] = []
        self._paths: list[Path] = []
        for cls in folders:  # folder order, so that a classes.txt changes labels, never the item order
            label = keys.index(cls)
            for p in class_images(split_dir / cls):
                rel = p.relative_to(split_dir / cls).with_suffix("").as_posix()
                self._records.append(ImageRecord(f"{cls}/{rel}", label))
                self._paths.append(p)
        if not self._records:
            raise PipeError(f"dataset '{self.name}': no images ({', '.join(SUFFIXES)}) under {split_dir}/<class>/")
        dup = next((i for i, n in Counter(r.id for r in self._records).items() if n > 1), None)
        if dup is not None:
            raise PipeError(f"dataset '{self.name}': two files with the id '{dup}' in {split_dir} (stem, two suffixes)")

    def _read_metadata(self, split_dir: Path, caption_key: str | None) -> bool:
        """A split folder with Hugging Face's `metadata.jsonl` or `metadata.csv` (`file_name` + a text column) is a
        pairs dataset: no classes, captions from the text column, images in the file's order, ids the file names
        without suffix. False (and nothing read) when there is no metadata file."""
        found = [split_dir / n for n in METADATA_FILES if (split_dir / n).is_file()]
        if not found:
            if caption_key is not None:
                raise PipeError(
                    f"dataset '{self.name}': option caption_key applies to a split folder with "
                    f"{' or '.join(METADATA_FILES)}; {split_dir} has neither"
                )
            return False
        if len(found) > 1:
            raise PipeError(f"dataset '{self.name}': both {found[0]} and {found[1]}; keep one")
        meta = found[0]
        caption_key = string_option(self.name, "caption_key", caption_key or "text")
        columns, rows = read_table(meta, None, METADATA_IMAGE_KEY)
        require_columns(meta, columns, rows, {METADATA_IMAGE_KEY: "file_name", caption_key: "caption_key"})
        groups = group_rows(self.name, meta, rows, METADATA_IMAGE_KEY, caption_key)
        self.labelled, self.classes, self.imagenet = False, None, False
        self._records, self._paths, self._captions = groups.records, groups.sources, groups.captions()
        return True

    def images(self) -> list[ImageRecord]:
        return self._records

    def captions(self) -> list[Caption] | None:
        return self._captions

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def templates(self) -> list[str]:
        return imagenet_templates() if self.imagenet else super().templates()
