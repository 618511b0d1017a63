"""`webdataset`: image-caption samples in tar shards, as img2dataset writes them (`KEY.jpg` + `KEY.txt` + `KEY.json`).

Opening the reader lists every shard once with the standard library's tarfile: member headers are read and image
data is seeked over (nothing is unpacked to disk; only caption members are read). `load_image` then reads one image's
bytes at the offset the listing recorded, so rows are read by index like every other reader (resume, dask shards and
decode threads need that), and the image bytes are read once.

tarfile takes a truncated or corrupt archive as ending early, without an error; the listing checks that the archive
ends with the end-of-archive block, so lost members are a dataset error naming the shard and the byte offset.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import PipeError
from .base import (
    Caption,
    Dataset,
    ImageRecord,
    UnreadableImage,
    clean_text,
    register_dataset,
)
from .pairs import (
    PairGroups,
    caption_texts,
    decode_image,
    open_source,
    source_files,
    string_option,
)

SHARD_SUFFIXES = (".tar",)
IMAGE_EXTENSIONS = "jpg;jpeg;png;webp;bmp;tif;tiff"
BLOCK = tarfile.BLOCKSIZE
# webdataset's key rule: the sample key is the member path up to the first dot of its file name; the rest, lower
# case, is the extension ("a/b.seg.png" -> key "a/b", extension "seg.png").
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


@dataclass(frozen=True)
class Sample:
    shard: int  # index into the shard list
    offset: int  # byte offset of the image data in the shard
    size: int
    member: str  # the image member's name, for messages
    problem: str | None = None  # why the sample cannot be a pair (no image, no caption): skipped like a bad image


@dataclass
class _Listing:
    """One sample's members found so far in a shard."""

    image: tuple[int, int, str] | None = None  # (offset, size, member name) of the preferred image extension
    image_rank: int = 1 << 30
    texts: list[str] | None = None


def _check_end(f, path: Path, end: int) -> None:
    """The archive must end with a zero block where tarfile stopped; anything else is truncation or damage."""
    f.seek(end)
    block = f.read(BLOCK)
    if len(block) < BLOCK:
        raise PipeError(
            f"damaged tar {path}: truncated at byte {end} (no end-of-archive block; a shard cut short loses samples)"
        )
    if block.strip(b"\0"):
        raise PipeError(f"damaged tar {path}: unreadable member header at byte {end}")


@register_dataset("webdataset")
class WebDataset(Dataset):
    """Samples of one or more shards, in shard order and then in order of first appearance in a shard. The image is
    the first of `image_key`'s extensions present (`;`-separated, webdataset's `to_tuple` style); the caption is
    the `caption_key` member (default `.txt`, one caption) or, with `-o json_key=FIELD`, that field of the sample's
    `.json` (a string or a list of strings). Id = the sample key; captions `<key>#<j>`. A sample without image or
    caption stays a row that is skipped and listed like an unreadable image (fatal with --strict)."""

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        *,
        image_key: str = IMAGE_EXTENSIONS,
        caption_key: str = "txt",
        json_key: str | None = None,
    ) -> None:
        super().__init__(root, split)
        exts = [e.strip().lower().lstrip(".") for e in string_option(self.name, "image_key", image_key).split(";")]
        self.image_exts = [e for e in exts if e]
        self.caption_ext = string_option(self.name, "caption_key", caption_key).lower().lstrip(".")
        self.json_key = None if json_key is None else string_option(self.name, "json_key", json_key)
        self.shards = source_files(self.name, root, SHARD_SUFFIXES, "tar shards")
        groups = PairGroups(self.name)
        samples: list[Sample] = []
        for s, path in enumerate(self.shards):
            for key, found in self._list_shard(path).items():
                where = f"{path} sample {key}"
                texts = found.texts or []
                problem = None
                if found.image is None:
                    problem = f"has no image ({', '.join('.' + e for e in self.image_exts)})"
                elif not texts:
                    problem = (
                        "has no caption ("
                        + (f".json field '{self.json_key}'" if self.json_key else f".{self.caption_ext}")
                        + ")"
                    )
                offset, size, member = found.image or (0, 0, "")
                groups.add(key, key, None, texts, where)
                if len(groups) == len(samples):  # the key was seen in an earlier shard
                    raise PipeError(
                        f"dataset '{self.name}': sample key '{key}' is in two shards ({where} and {groups.owner[key]})"
                    )
                samples.append(Sample(s, offset, size, member, problem))
        if not samples:
            raise PipeError(f"dataset '{self.name}': no samples in {len(self.shards)} shard(s) under --root {root}")
        self._samples = samples
        self._records: list[ImageRecord] = groups.records
        self._captions: list[Caption] = groups.captions()

    def _list_shard(self, path: Path) -> dict[str, _Listing]:
        """key -> the sample's image member and captions, for one shard; a damaged archive is one line."""
        found: dict[str, _Listing] = {}
        seen: set[tuple[str, str]] = set()
        with open_source(path) as f:
            if f.read(2) == b"\x1f\x8b":
                raise PipeError(
                    f"{path} is a gzip-compressed tar; webdataset shards are read as plain .tar (decompress it: gunzip)"
                )
            f.seek(0)
            tar = None
            try:
                tar = tarfile.open(fileobj=f, mode="r:")
                for m in tar:
                    self._member(tar, m, path, found, seen)
            except (tarfile.TarError, EOFError) as e:
                raise PipeError(f"damaged tar {path}: {e} at byte {tar.offset if tar else 0}") from None
            _check_end(f, path, tar.offset)
        return found

    def _member(
        self,
        tar: tarfile.TarFile,
        m: tarfile.TarInfo,
        path: Path,
        found: dict[str, _Listing],
        seen: set[tuple[str, str]],
    ) -> None:
        match = _KEY.match(m.name) if m.isfile() else None
        if match is None:
            return
        key, ext = match.group(1), match.group(2).lower()
        if (key, ext) in seen:
            raise PipeError(f"dataset '{self.name}': {path} holds member {m.name} twice (at byte {m.offset})")
        seen.add((key, ext))
        entry = found.setdefault(key, _Listing())
        if ext in self.image_exts and self.image_exts.index(ext) < entry.image_rank:
            entry.image, entry.image_rank = (m.offset_data, m.size, m.name), self.image_exts.index(ext)
        elif self.json_key is None and ext == self.caption_ext:
            entry.texts = [clean_text(self._text(tar, m, path), f"{path} member {m.name}")]
        elif self.json_key is not None and ext == "json":
            where = f"{path} member {m.name}"
            try:
                obj = json.loads(self._text(tar, m, path))
            except json.JSONDecodeError as e:
                raise PipeError(f"malformed JSON in {where}: {e.msg} at line {e.lineno} column {e.colno}") from None
            value = obj.get(self.json_key) if isinstance(obj, dict) else None
            entry.texts = caption_texts(value, f"{where} field '{self.json_key}'") if value is not None else None

    @staticmethod
    def _text(tar: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> str:
        try:
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError) as e:
            raise PipeError(f"damaged tar {path}: member {m.name} (at byte {m.offset}) is cut short ({e})") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipeError(f"{path} member {m.name} (at byte {m.offset}) is not UTF-8 text ({e.reason})") from None

    def images(self) -> list[ImageRecord]:
        return self._records

    def captions(self) -> list[Caption] | None:
        return self._captions

    def load_image(self, i: int) -> Image.Image:
        s = self._samples[i]
        path = self.shards[s.shard]
        if s.problem is not None:
            raise UnreadableImage(f"{path} sample {self._records[i].id} {s.problem}")
        try:
            with open_source(path) as f:
                f.seek(s.offset)
                data = f.read(s.size)
        except OSError as e:  # the shard, not the image: every row of it is suspect
            raise PipeError(f"cannot read {path}: {e}") from None
        if len(data) != s.size:
            raise PipeError(f"{path} is shorter than when it was listed (member {s.member} at byte {s.offset})")
        return decode_image(data, f"{path} member {s.member}")
