"""torchvision-style ImageFolder: root/<split>/<class>/<image>, class index = position in the sorted class names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from pipe_align.extract.datasets.base import (
    IMAGE_SUFFIXES,
    Dataset,
    ImageRecord,
    open_rgb,
    read_name_list,
    register_dataset,
    require_dir,
    require_root,
)
from pipe_align.extract.errors import PipeError

CLASSES_FILE = "classes.txt"


@register_dataset("imagefolder")
class ImageFolder(Dataset):
    """Classes are the sorted sub-folders of root/<split>, unless root/classes.txt fixes them (one per line, in
    label order): use that file when a split lacks some class folder, or labels would shift between splits.
    Item ids are "<class>/<stem>", since stems alone may repeat across class folders."""

    labelled = True

    def __init__(self, root: str | Path | None, split: str = "val") -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        split_dir = require_dir(self.root / split, f"dataset '{self.name}': split")
        folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        names_file = self.root / CLASSES_FILE
        if names_file.is_file():
            self.classes = read_name_list(names_file)
            extra = next((f for f in folders if f not in self.classes), None)
            if extra is not None:
                raise PipeError(f"class folder '{extra}' in {split_dir} is not listed in {names_file}")
        else:
            self.classes = folders
        if not folders:
            raise PipeError(f"dataset '{self.name}': no class folders in {split_dir}")
        self._records: list[ImageRecord] = []
        self._paths: list[Path] = []
        for cls in folders:  # folder order, so that a classes.txt changes labels, never the item order
            label = self.classes.index(cls)
            for p in sorted((split_dir / cls).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    self._records.append(ImageRecord(f"{cls}/{p.stem}", label))
                    self._paths.append(p)
        if not self._records:
            raise PipeError(f"dataset '{self.name}': no images ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}")
        dup = next((i for i, n in Counter(r.id for r in self._records).items() if n > 1), None)
        if dup is not None:
            raise PipeError(f"dataset '{self.name}': two files with the id '{dup}' in {split_dir} (stem, two suffixes)")

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])
