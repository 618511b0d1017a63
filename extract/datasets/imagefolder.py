"""torchvision-style ImageFolder: root/<split>/<class>/**/<image>; class index = position among the sorted folders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from pipe_align.extract.datasets.base import (
    IMAGE_SUFFIXES,
    Dataset,
    ImageRecord,
    inside,
    open_rgb,
    read_text,
    register_dataset,
    require_root,
)
from pipe_align.extract.datasets.imagenet_classes import imagenet_classes, imagenet_templates
from pipe_align.extract.errors import PipeError

CLASSES_FILE = "classes.txt"
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
    Item ids are "<class>/<path below it, without suffix>", since stems alone may repeat across folders."""

    labelled = True

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        split_dir = self.root / split
        if not split_dir.is_dir() and self.root.name == split:  # --root given as the split folder itself
            split_dir, self.root = self.root, self.root.parent
        if not split_dir.is_dir():
            raise PipeError(f"dataset '{self.name}': split folder not found: {split_dir} (expected "
                            f"<root>/{split}/<class>/<images>)")  # fmt: skip
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

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def templates(self) -> list[str]:
        return imagenet_templates() if self.imagenet else super().templates()
