"""What the readers of users' own image-caption pairs share (csv, imagefolder metadata, webdataset, parquet): finding
the source files a `--root` names, opening one, turning cells into captions, grouping rows into images, and decoding
image bytes.

Ids are derived from the data itself (a path, a sample key, a file and row), never from the order of a run, so the
same row gets the same id every time: resume, the run key's content fingerprints and `pipe verify` rely on it.
"""

from __future__ import annotations

import glob
import io
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from ..errors import PipeError
from .base import Caption, ImageRecord, UnreadableImage, clean_text, to_rgb

_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB = re.compile(r"[*?[]")


def expand_braces(pattern: str) -> list[str]:
    """Bash brace expansion of a shard pattern: `{a,b}` alternatives and `{00000..00127}` integer ranges (zero-padded
    to the wider end when either end starts with 0, as bash pads), nested and several per pattern, left to right.
    A pattern without braces is itself; an unbalanced or empty group is an error (bash would keep it literally, but
    in a shard list that is a typo, not a file name)."""
    depth, start = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "}":
            if depth == 0:
                raise PipeError(f"unbalanced '}}' in {pattern!r}")
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                return [out for alt in _alternatives(body, pattern) for out in expand_braces(head + alt + tail)]
    if depth:
        raise PipeError(f"unbalanced '{{' in {pattern!r}")
    return [pattern]


def _alternatives(body: str, pattern: str) -> list[str]:
    m = _RANGE.fullmatch(body)
    if m:
        a, b = m.group(1), m.group(2)
        padded = any(s.lstrip("-").startswith("0") and len(s.lstrip("-")) > 1 for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        return [f"{v:0{width}d}" for v in range(lo, hi + step, step)]
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += (ch == "{") - (ch == "}")
        cur.append(ch)
    parts.append("".join(cur))
    if len(parts) < 2:
        raise PipeError(f"brace group {{{body}}} in {pattern!r} has no ',' or '..'")
    return parts


def is_url(path: str) -> bool:
    return "://" in path


def source_files(name: str, root: str | Path | None, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """The files `--root` names, in a stable order: one file, a folder (its files ending in `suffixes`, sorted by
    name), a glob (sorted), or a brace pattern (in expansion order; every expanded name must exist: a missing shard
    is lost data, not an empty one). `what` names the files in errors ("tar shards")."""
    if root is None:
        raise PipeError(f"dataset '{name}' needs --root: a file, a folder, a glob or a brace pattern of {what}")
    text = os.path.expanduser(str(root))
    if is_url(text):
        raise PipeError(f"dataset '{name}': --root {text} is a URL; only local paths are read")
    if "{" in text or "}" in text:
        out: list[Path] = []
        for one in expand_braces(text):
            found = sorted(glob.glob(one)) if _GLOB.search(one) else ([one] if Path(one).is_file() else [])
            if not found:
                why = f"is a folder, not one of the {what}" if Path(one).is_dir() else "does not exist"
                raise PipeError(f"dataset '{name}': {one} (from --root {text}) {why}")
            out += [Path(p) for p in found]
        return list(dict.fromkeys(out))
    if _GLOB.search(text) and not Path(text).exists():
        files = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
        if not files:
            raise PipeError(f"dataset '{name}': no file matches --root {text}")
        return files
    path = Path(text)
    if path.is_dir():
        files = [
            p
            for p in sorted(path.iterdir())
            if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
        ]
        if not files:
            raise PipeError(f"dataset '{name}': no {what} ({', '.join(suffixes)}) in {path}")
        return files
    if path.is_file():
        return [path]
    raise PipeError(f"dataset '{name}': --root {path} does not exist")


def open_source(path: str | Path) -> BinaryIO:
    """A binary, seekable file object for one source file (shard, table). The one place that opens them, so that
    object-storage URLs can plug in (fsspec) without touching the readers."""
    return open(path, "rb")


def caption_texts(value: object, where: str) -> list[str]:
    """A caption cell as captions: one string, or a list of strings (several captions of one image, as Hugging Face
    exports and webdataset .json files hold them). Each must be text with something to read; a null cell or an
    empty list is an empty caption, named with its place."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise PipeError(f"empty caption in {where}: an empty list")
        return [clean_text(v, f"{where}, caption {j}") for j, v in enumerate(value)]
    return [clean_text(value, where)]


def string_option(dataset: str, key: str, value: object) -> str:
    """A column or key name: a non-empty string (a number from the CLI's JSON parsing is taken as its text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise PipeError(f"dataset '{dataset}': option {key}={value!r} must be a non-empty name")
    return str(value).strip()


def decode_image(data: bytes, where: str) -> Image.Image:
    """Image bytes held in a container (a tar member, a parquet cell) as RGB, fully decoded; a bad image is that
    item's problem (UnreadableImage), never the container's."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"unreadable image {where}: {e}") from None


class PairGroups:
    """Rows of (image, captions) in file order -> images in order of first appearance, each image's captions in file
    order. Rows naming the same image (same `key`) are one image with several captions; caption ids are
    f"{image id}#{j}" (Karpathy's convention), so they are as stable as the image ids."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.index: dict[object, int] = {}
        self.records: list[ImageRecord] = []
        self.sources: list[object] = []  # where each image is read from (a path, a member offset, a row)
        self.texts: list[list[str]] = []
        self.owner: dict[str, str] = {}  # image id -> the place that first gave it (for the duplicate-id error)

    def add(self, key: object, image_id: str, source: object, texts: Iterable[str], where: str) -> int:
        i = self.index.get(key)
        if i is None:
            if image_id in self.owner:
                raise PipeError(
                    f"dataset '{self.dataset}': {where} and {self.owner[image_id]} are different images "
                    f"with the same id '{image_id}'"
                )
            i = self.index[key] = len(self.records)
            self.owner[image_id] = where
            self.records.append(ImageRecord(image_id))
            self.sources.append(source)
            self.texts.append([])
        self.texts[i].extend(texts)
        return i

    def captions(self) -> list[Caption]:
        return [
            Caption(f"{rec.id}#{j}", text, i)
            for i, rec in enumerate(self.records)
            for j, text in enumerate(self.texts[i])
        ]

    def __len__(self) -> int:
        return len(self.records)
