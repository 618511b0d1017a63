"""Flickr30k Entities (Plummer et al., ICCV 2015): Flickr30k captions with their noun phrases linked to boxes.

Layout (the two releases unpacked side by side under --root):

    flickr30k_entities/Sentences/<id>.txt     5 sentences, phrases marked `[/EN#<entity>/<type>[/<type>...] words]`
    flickr30k_entities/Annotations/<id>.xml   per entity (`<object><name>entity</name>`): `<bndbox>` (one per box,
                                              1-based inclusive pixels), or `<nobndbox>` / `<scene>`
    flickr30k_entities/{train,val,test}.txt   image ids of each split
    flickr30k-images/<id>.jpg

Reading is strict, as the issue that asked for it: an unbalanced bracket, a malformed tag, an entity a sentence
names that the image's annotation lists nowhere, or a box outside the image is a one-line error naming file and
line. Entity 0 is the release's "not visual" marker and has no annotation entry by design; such phrases stay in the
caption text but are not marked. Boxes are converted to 0-based half-open pixels ([x0, x1) with x0 = xmin - 1,
x1 = xmax), the convention of the release's own parser (flickr30k_entities_utils.get_annotations subtracts 1).
"""

from __future__ import annotations

import re
import xml.parsers.expat
from pathlib import Path

from PIL import Image

from ..errors import PipeError
from .base import (
    Caption,
    CaptionFiles,
    Entity,
    Grounding,
    ImageRecord,
    Phrase,
    read_id_list,
    read_text,
    register_dataset,
    require_dir,
    require_root,
    stems,
)

TAG = re.compile(r"^\[/EN#(\d+)((?:/[^\s/\[\]]+)+)$")  # "[/EN#18/people" or "[/EN#7/other/bodyparts"
NOT_VISUAL = 0


def parse_sentence(line: str, where: str) -> tuple[str, list[tuple[int, int, int, tuple[str, ...]]]]:
    """(plain text, [(char start, char stop, entity, types)]) of one marked sentence; words are re-joined by one
    space, as the release's own parser splits them. Any markup it would misread is a PipeError naming `where`."""
    words: list[str] = []
    phrases: list[tuple[int, int, int, tuple[str, ...]]] = []
    open_tag: tuple[int, int, tuple[str, ...]] | None = None  # (char start, entity, types)
    pos = 0
    for token in line.split():
        if token.startswith("["):
            if open_tag is not None:
                raise PipeError(f"{where}: '[' inside an open phrase (unbalanced bracket)")
            m = TAG.match(token)
            if not m:
                raise PipeError(f"{where}: malformed phrase tag {token!r} (expected [/EN#<id>/<type> words])")
            open_tag = (pos + (1 if words else 0), int(m.group(1)), tuple(m.group(2).strip("/").split("/")))
            continue
        word, closes = token, False
        if token.endswith("]"):
            if open_tag is None:
                raise PipeError(f"{where}: ']' without an open phrase (unbalanced bracket)")
            word, closes = token[:-1], True
        if "[" in word or "]" in word or not word:
            raise PipeError(f"{where}: stray bracket in {token!r} (unbalanced bracket)")
        pos += (1 if words else 0) + len(word)
        words.append(word)
        if closes:
            start, entity, types = open_tag  # type: ignore[misc]
            phrases.append((start, pos, entity, types))
            open_tag = None
    if open_tag is not None:
        raise PipeError(f"{where}: phrase opened but never closed (unbalanced bracket)")
    if not words:
        raise PipeError(f"{where}: empty sentence")
    return " ".join(words), phrases


def parse_annotation(path: Path) -> tuple[int, int, dict[int, list[tuple[float, float, float, float]]]]:
    """(width, height, entity -> boxes) of one annotation XML; entities with <nobndbox>/<scene> map to []. A box
    outside the image or inverted is a PipeError naming file and line."""
    size: dict[str, int] = {}
    entities: dict[int, list[tuple[float, float, float, float]]] = {}
    stack: list[str] = []
    obj: dict = {}
    text: list[str] = []
    parser = xml.parsers.expat.ParserCreate()

    def start(name: str, attrs: dict) -> None:
        nonlocal obj
        stack.append(name)
        text.clear()
        if name == "object":
            obj = {"names": [], "boxes": [], "line": parser.CurrentLineNumber}
        elif name == "bndbox":
            obj["box"], obj["box_line"] = {}, parser.CurrentLineNumber

    def end(name: str) -> None:
        value = "".join(text).strip()
        stack.pop()
        parent = stack[-1] if stack else ""
        line = parser.CurrentLineNumber
        try:
            if parent == "size" and name in ("width", "height"):
                size[name] = int(value)
            elif parent == "object" and name == "name":
                obj["names"].append(int(value))
            elif parent == "bndbox" and name in ("xmin", "ymin", "xmax", "ymax"):
                obj["box"][name] = float(value)
        except ValueError:
            raise PipeError(f"{path}:{line}: <{name}> is {value!r}, not a number") from None
        if name == "bndbox":
            b = obj.pop("box")
            if set(b) != {"xmin", "ymin", "xmax", "ymax"}:
                missing = sorted({"xmin", "ymin", "xmax", "ymax"} - set(b))
                raise PipeError(f"{path}:{obj['box_line']}: <bndbox> lacks {', '.join(missing)}")
            obj["boxes"].append((b["xmin"] - 1, b["ymin"] - 1, b["xmax"], b["ymax"], obj["box_line"]))
        elif name == "object":
            for entity in obj["names"]:
                entities.setdefault(entity, []).extend(obj["boxes"])
        text.clear()

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(path.read_bytes(), True)
    except xml.parsers.expat.ExpatError as e:
        raise PipeError(f"{path}:{e.lineno}: malformed XML ({xml.parsers.expat.errors.messages[e.code]})") from None
    except OSError as e:
        raise PipeError(f"{path}: cannot be read ({e.strerror})") from None
    if "width" not in size or "height" not in size:
        raise PipeError(f"{path}: no <size> with <width> and <height>")
    w, h = size["width"], size["height"]
    out: dict[int, list[tuple[float, float, float, float]]] = {}
    for entity, boxes in entities.items():
        out[entity] = []
        for x0, y0, x1, y1, line in boxes:
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise PipeError(
                    f"{path}:{line}: box of entity {entity} ({x0 + 1:g}, {y0 + 1:g}, {x1:g}, {y1:g}) is "
                    f"outside the {w}x{h} image or empty"
                )
            out[entity].append((x0, y0, x1, y1))
    return w, h, out


@register_dataset("flickr30k-entities")
class Flickr30kEntities(CaptionFiles):
    """Images of a split in the split file's order; captions f"{id}#{j}" in sentence order, phrases marked."""

    splits = ("train", "val", "test")
    phrase_store = True  # grounding is what the set is for: its caption extraction writes the phrase store too
    image_dirs = ("flickr30k-images", "flickr30k_images", "flickr30k_images/flickr30k_images")

    def __init__(self, root: str | Path | None, split: str = "test") -> None:
        super().__init__(root, split)
        self.root = require_root(self.name, root)
        base = require_dir(self.root / "flickr30k_entities", "Flickr30k Entities (flickr30k_entities/)")
        self.sentences, self.annotations = base / "Sentences", base / "Annotations"
        ids = read_id_list(base / f"{split}.txt")
        folder = next((self.root / d for d in self.image_dirs if (self.root / d).is_dir()), None)
        if folder is None:
            raise PipeError(f"dataset '{self.name}': no image folder ({' or '.join(self.image_dirs)}) in {self.root}")
        files = stems(folder)
        self._records, self._paths, self._captions = [], [], []
        self._groundings: list[Grounding] = []
        for item, iid in enumerate(ids):
            if iid not in files:
                raise PipeError(f"{base / f'{split}.txt'} names image {iid!r}, absent from {folder}")
            self._records.append(ImageRecord(iid))
            self._paths.append(files[iid])
            self._groundings.append(self._read(iid, item))
        self._checked: set[int] = set()

    def _read(self, iid: str, item: int) -> Grounding:
        """Sentences (captions appended) and annotation of one image, checked against each other: every entity a
        sentence marks must have an entry in the XML (a box, <nobndbox> or <scene>)."""
        path = self.sentences / f"{iid}.txt"
        if not path.is_file():
            raise PipeError(f"file not found: {path}")
        xml_path = self.annotations / f"{iid}.xml"
        if not xml_path.is_file():
            raise PipeError(f"file not found: {xml_path}")
        w, h, boxes = parse_annotation(xml_path)
        entities: dict[int, Entity] = {}
        lines = [(n, line) for n, line in enumerate(read_text(path, "sentence file").splitlines(), 1) if line.strip()]
        for j, (n, line) in enumerate(lines):
            text, marked = parse_sentence(line, f"{path}:{n}")
            phrases = []
            for start, stop, entity, kinds in marked:
                if entity == NOT_VISUAL:
                    continue
                if entity not in boxes:
                    raise PipeError(f"{path}:{n}: entity {entity} has no entry in {xml_path}")
                entities.setdefault(entity, Entity(kinds, tuple(boxes[entity])))
                phrases.append(Phrase(start, stop, entity))
            self._captions.append(Caption(f"{iid}#{j}", text, item, tuple(phrases)))
        return Grounding(w, h, entities)

    def has_boxes(self) -> bool:
        return True

    def load_boxes(self, i: int) -> Grounding:
        """The image's entities; the annotation's image size must be the image file's (checked on first use)."""
        g = self._groundings[i]
        if i not in self._checked:
            try:
                with Image.open(self._paths[i]) as img:
                    size = img.size
            except OSError as e:
                raise PipeError(f"unreadable image {self._paths[i]}: {e}") from None
            if size != (g.width, g.height):
                raise PipeError(
                    f"{self.annotations / f'{self._records[i].id}.xml'}: says the image is "
                    f"{g.width}x{g.height}, {self._paths[i]} is {size[0]}x{size[1]}"
                )
            self._checked.add(i)
        return g
