"""The dataset interface, the name registry, and small helpers every reader shares.

Readers parse annotation files in their constructor (cheap, and bad input fails before any GPU time is spent) but
decode images only on `load_image`, so no reader ever holds a whole image set in memory.
"""

from __future__ import annotations

import abc
import inspect
import json
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from ..registry import Registry

# A handful of the CLIP ImageNet templates (Radford et al. 2021), "{}" = class name. Used by every labelled set
# unless a reader knows better, so that prompts for one class name are the same across datasets.
CLIP_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "there is a {} in the scene.",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class UnreadableImage(PipeError):
    """One item's file is missing, corrupt or inconsistent: the extraction runner skips the item, not the run."""


@dataclass(frozen=True)
class ImageRecord:
    id: str  # the item's id in the dataset (file stem)
    label: int = -1  # class index for classification sets, -1 otherwise


@dataclass(frozen=True)
class Phrase:
    """A phrase of a caption that names an entity of its image (Flickr30k Entities markup): characters
    text[start:stop], and the entity's id within the image (boxes and types stay with the reader: `load_boxes`)."""

    start: int
    stop: int
    entity: int


@dataclass(frozen=True)
class Caption:
    id: str  # caption id (e.g. COCO annotation id, or f"{image_id}#{j}")
    text: str
    item: int  # index into Dataset.images() of the image it describes
    phrases: tuple[Phrase, ...] = ()  # marked phrases, in caption order (readers with phrase markup)


@dataclass(frozen=True)
class Entity:
    """What a phrase's entity is in its image: its types (Flickr30k Entities: people, clothing, ...) and its
    ground-truth boxes (x0, y0, x1, y1) in pixels of the image as loaded, x1/y1 exclusive; no box: not groundable."""

    types: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class Grounding:
    """The entities of one image, with the image's size (width, height) their boxes refer to."""

    width: int
    height: int
    entities: dict[int, Entity]


class Dataset(abc.ABC):
    """One split of one dataset. Subclasses set `classes` in their constructor when the set is labelled.

    The label-space facts below are class attributes, so that evaluation can read them from the registry by the
    dataset name recorded in a feature store, without opening any dataset file (docs/datasets.md, "Label space").
    """

    name: str = ""  # filled by @register_dataset
    splits: tuple[str, ...] = ()  # the split names the reader accepts; empty = any (checked by the reader)
    labelled: bool = False  # the reader sets `classes` (class prompts, classification, segmentation are possible)
    split: str
    classes: list[str] | None = None
    # -- label space ------------------------------------------------------------------------------------------------
    ignore_index: int = 255  # mask value of void pixels, never counted
    background: int | None = None  # class index of a background class: never an image label, left out of fg_mIoU
    reduce_zero_label: bool = False  # mask label 0 means "unlabelled" and is ignored; classes 1.. are scored
    # -- store path -------------------------------------------------------------------------------------------------
    store_name: str = ""  # the dataset folder of this instance's stores when not the name given (coco -> coco2017)
    store_names: tuple[str, ...] = ()  # every store_name an instance may take: where evaluation looks for stores
    phrase_store: bool = False  # `pipe extract` of its captions also writes the phrases as their own texts

    @classmethod
    def seen_classes(cls, options: dict) -> list[str] | None:
        """The classes a store extracted with these -o options can show, when an option restricts them (the
        unseen-classes protocol: a run trained on it has never seen the others); None when nothing is restricted."""
        return None

    def __init__(self, root: str | Path | None, split: str) -> None:
        if self.splits and split not in self.splits:
            raise PipeError(f"dataset '{self.name}' has no split '{split}' (choose from: {', '.join(self.splits)})")
        self.split = split

    @abc.abstractmethod
    def images(self) -> list[ImageRecord]:
        """De-duplicated items in a deterministic order; their index is the row of the image store."""

    @abc.abstractmethod
    def load_image(self, i: int) -> Image.Image:
        """Item i as RGB; raises (UnreadableImage) for an unreadable file so that the caller can skip it."""

    def captions(self) -> list[Caption] | None:
        """Captions with their image index, or None for sets without captions."""
        return None

    def has_masks(self) -> bool:
        return False

    def load_mask(self, i: int) -> np.ndarray:
        """uint8 HxW class indices (255 = void), the same HxW as load_image(i)."""
        raise PipeError(f"dataset '{self.name}' has no segmentation masks")

    def has_boxes(self) -> bool:
        """Whether captions mark phrases and `load_boxes` gives their entities' boxes (phrase grounding)."""
        return False

    def load_boxes(self, i: int) -> Grounding:
        """The entities of item i with their boxes (readers with phrase markup)."""
        raise PipeError(f"dataset '{self.name}' has no phrase boxes")

    def templates(self) -> list[str]:
        """Prompt templates ("{}" = class name) for labelled sets; empty for unlabelled ones."""
        return list(CLIP_TEMPLATES) if self.classes else []

    def __len__(self) -> int:
        return len(self.images())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)})"


DATASETS: Registry[type[Dataset]] = Registry("dataset", name_attr="name")


def defines_boxes(cls: type[Dataset]) -> bool:
    """Whether a reader defines phrase boxes (overrides `has_boxes`): the readers `pipe claims` and phrase grounding
    can use, listed in their help."""
    return cls.has_boxes is not Dataset.has_boxes


def register_dataset(name: str, *, aliases: Iterable[str] = ()) -> Callable[[type[Dataset]], type[Dataset]]:
    """Class decorator: make a reader reachable by name from the CLI and the config (its module must be listed in
    extract/datasets/__init__.py). A name is registered once (extract/registry.py)."""
    return DATASETS.register(name, aliases=aliases)


def dataset_class(name: str) -> type[Dataset]:
    """The reader registered under `name` (its class attributes hold the label-space facts); unknown names fail
    with the valid choices. Case and surrounding spaces do not matter (VOC, coco )."""
    return DATASETS.get(name.strip().lower())


def get_dataset(name: str, root: str | Path | None, split: str, **options: object) -> Dataset:
    """Open one split of a registered dataset; unknown names and options fail with the valid choices."""
    cls = dataset_class(name)
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p, v in params.items() if v.kind == inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in valid:
            choices = ", ".join(valid) if valid else "none"
            raise PipeError(f"dataset '{cls.name}' has no option '{key}' (options: {choices})")
    dataset = cls(root, split, **options)
    # The class attribute is what error messages list; an instance may say otherwise (an imagefolder split with
    # caption metadata has no classes).
    if (dataset.classes is not None) != dataset.labelled:
        raise TypeError(f"dataset reader '{cls.name}': labelled={dataset.labelled} but classes={dataset.classes!r:.40}")
    return dataset


# ---------------------------------------------------------------------------------------------------- helpers


def require_root(name: str, root: str | Path | None) -> Path:
    """The root folder as a Path; a missing one is the most common user error, so say which path was tried."""
    if root is None:
        raise PipeError(f"dataset '{name}' needs a root folder (--root)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise PipeError(f"dataset '{name}': root folder not found: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PipeError(f"{what} folder not found: {path}")
    return path


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` as given, unless it leads (symlinks followed) outside `root`: a reader opens files of its dataset by
    name, and a symlink in a downloaded dataset must not make it read a file elsewhere and store what it holds (class
    names, ids, labels). Files the user names (an option, --root itself) are not checked; `root` is the dataset
    folder the reader found, itself resolved, so a root that is a link works."""
    real, base = path.resolve(), root.resolve()
    if real != base and not real.is_relative_to(base):
        raise PipeError(
            f"{what} {path} leads outside the dataset folder {root} (to {real}); a reader opens only "
            "files inside its dataset: copy the file there instead of linking it"
        )
    return path


def read_json(path: Path) -> object:
    """Parse a JSON file; malformed JSON becomes a one-line PipeError naming the file and position."""
    if not path.is_file():
        raise PipeError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PipeError(f"malformed JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise PipeError(f"malformed JSON in {path}: not UTF-8 text ({e.reason})") from None


def read_text(path: Path, what: str) -> str:
    """A small UTF-8 text file (split list, class list); binary garbage is a one-line error naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipeError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_id_list(path: Path) -> list[str]:
    """A split file: one id per line (first whitespace-separated field), blank lines skipped, de-duplicated."""
    if not path.is_file():
        raise PipeError(f"split file not found: {path}")
    ids = [line.split()[0] for line in read_text(path, "split file").splitlines() if line.strip()]
    return unique(ids)


def read_name_list(path: Path) -> list[str]:
    """A classes.txt: one name per line, blank lines skipped."""
    names = [line.strip() for line in read_text(path, "class list").splitlines() if line.strip()]
    if not names:
        raise PipeError(f"class list is empty: {path}")
    return names


def unique(items: Iterable[str]) -> list[str]:
    """De-duplicate keeping the first occurrence, so the order stays the file's."""
    return list(dict.fromkeys(items))


def stems(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """stem -> file for the image files of a folder, listed once (cheaper than one stat per id on big sets)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in suffixes and p.stem not in out:
            out[p.stem] = p
    return out


# Unicode categories with nothing to read: controls, format characters (zero-width space, BOM, ...), unassigned and
# private-use code points, separators, and combining marks (which only modify a letter that is not there).
_INVISIBLE = ("C", "Z", "M")


def is_blank(text: str) -> bool:
    """True when a text has no visible character: tokenizers drop all of it and the row would get 0 tokens."""
    return all(unicodedata.category(ch)[0] in _INVISIBLE for ch in text)


def clean_text(text: object, where: str) -> str:
    """One caption as one line of text. A caption that is not a JSON string (a number, a list) is a broken file,
    not text to stringify; one without a visible character is empty. Both are data errors naming their place."""
    if not isinstance(text, str):
        raise PipeError(f"{where}: caption must be a string, got {json.dumps(text)[:60]}")
    if is_blank(text):
        raise PipeError(f"empty caption in {where}: {text!r} has no visible character")
    return " ".join(text.split())


def int_option(dataset: str, key: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer option, also from its CLI string form ("3"); anything else, or a value out of range, names the
    option."""
    try:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise PipeError(f"dataset '{dataset}': option {key}={value!r} is not an integer") from None
    if minimum is not None and out < minimum:
        raise PipeError(f"dataset '{dataset}': option {key}={value!r} must be >= {minimum}")
    if maximum is not None and out > maximum:
        raise PipeError(f"dataset '{dataset}': option {key}={value!r} must be <= {maximum}")
    return out


def bool_option(dataset: str, key: str, value: object) -> bool:
    """A yes/no option: true/false, 1/0, yes/no (any case); anything else names the option instead of meaning no."""
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise PipeError(f"dataset '{dataset}': option {key}={value!r} must be true or false")


# 16-bit grey images (PNG, TIFF): PIL's convert("RGB") clips every value above 255 to white. Scale instead, the way
# 8-bit pipelines read them (v * 255 / 65535, rounded). Mode I is how PIL presents 16-bit data from some formats;
# it is read in the same 0..65535 range (values outside are clipped: a 32-bit image has no agreed display range).
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image as 8-bit RGB; high-bit-depth grey is scaled, not clipped."""
    if img.mode in HIGH_BIT_MODES:
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """Decode one image fully (so that truncation fails here, not later) and convert it to RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"unreadable image {path}: {e}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"unreadable image {path}: {e}") from None


def mask_file(path: Path) -> Path:
    """A mask found by listing its folder, unless it is a link leading out of that folder. The folder itself may be a
    link (SegmentationClassAug is often linked in from elsewhere); a single planted file may not."""
    return inside(path, path.parent, "mask")


def read_index_png(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A label PNG as its palette/grey indices (never the RGB colours), checked against the image size."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise UnreadableImage(f"mask {path} is mode {img.mode}, expected a palette (P) or grey (L) PNG")
            mask = np.array(img, dtype=np.uint8)
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"unreadable mask {path}: {e}") from None
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise UnreadableImage(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    return mask


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 ints): class c gets the bit-interleaved colour, 255 (void) is cream."""
    pal = []
    for c in range(256):
        r = g = b = 0
        cid = c
        for j in range(8):
            r |= ((cid >> 0) & 1) << (7 - j)
            g |= ((cid >> 1) & 1) << (7 - j)
            b |= ((cid >> 2) & 1) << (7 - j)
            cid >>= 3
        pal += [r, g, b]
    return pal


class CaptionFiles(Dataset):
    """Image files listed in a captions json (COCO, Karpathy): the readers fill `_records`, `_paths`, `_captions`."""

    _records: list[ImageRecord]
    _paths: list[Path]
    _captions: list[Caption]

    def images(self) -> list[ImageRecord]:
        return self._records

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self._paths[i])

    def captions(self) -> list[Caption] | None:
        return self._captions
