"""`world`: a built-in procedural dataset with captions, labels and exact masks, for tests and the demo.

Each image shows 1-3 objects from 12 everyday classes (distinct shapes and colours, drawn with PIL polygons) on one
of 5 textured backgrounds; objects have random size (a 50-130 px frame at 224), aspect, rotation, mirror, colour jitter
and may overlap (each keeps at least half of its area and about three 14 px patches visible). Captions (3-5 per
image, several sentence forms) name the objects and sometimes their colour, size and position, so that word tokens
have image regions to align to. Everything is a pure function of (seed, split, index): images are drawn when
asked for, never stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PipeError
from .base import (
    Caption,
    Dataset,
    Entity,
    Grounding,
    ImageRecord,
    Phrase,
    int_option,
    register_dataset,
)
from .world_draw import BACKGROUNDS, COLOURS, SHAPES, Placed, background, draw_object

WORLD_CLASSES = list(SHAPES)  # ball star tree house car fish flower moon heart cup key boat
CLASSES = ["background", *WORLD_CLASSES]
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 400, "val": 100, "test": 100}
# Bounds on the options, so that a typo fails in a second instead of exhausting memory: one 4096 px item is a 50 MB
# image plus a 17 MB mask (99999 px would be 37 GB), and the scene list of a split is built whole on first use.
MAX_IMAGE_SIZE = 4096
MAX_SIZE = 1_000_000
EXTENT = (50, 130)  # object frame in px at 224 (shapes fill 40-80% of it); less per object when there are more
SMALL, LARGE = 70, 105  # frame extents below / above which captions may say "small" / "large"
MIN_VISIBLE = 0.5  # fraction of an object's own area left uncovered
MIN_PIXELS = 3 * 14 * 14  # at 224 px: about three ViT patches
SIZE_BOOST = {"key": 1.2, "flower": 1.15, "moon": 1.1}  # thin shapes get a larger frame to cover as many patches
NUMBER = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Placed, ...]  # drawing order: later ones cover earlier ones
    visible: tuple[int, ...]  # visible pixels per object, same order
    texture_seed: int

    @property
    def label(self) -> int:
        """Class index (in CLASSES) of the object with the most visible pixels."""
        return CLASSES.index(self.objects[int(np.argmax(self.visible))].cls)


def _colour(rng: np.random.Generator, choices: tuple[str, ...], bg: str) -> tuple[str, tuple[float, float, float]]:
    """A main colour far enough from the background's that the object stays visible, jittered per object."""
    bg_rgb = np.array(BACKGROUNDS[bg][2], float)
    ok = [c for c in choices if np.linalg.norm(np.array(COLOURS[c], float) - bg_rgb) > 70] or list(choices)
    name = ok[int(rng.integers(len(ok)))]
    rgb = np.clip(np.array(COLOURS[name], float) * rng.uniform(0.85, 1.12) + rng.uniform(-14, 14, 3), 0, 255)
    return name, (float(rgb[0]), float(rgb[1]), float(rgb[2]))


def _render_mask(objects: list[Placed], size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    for obj in objects:
        draw_object(None, mask, obj, CLASSES.index(obj.cls), None)  # type: ignore[arg-type]
    return mask


def _visible(objects: list[Placed], size: int) -> list[int] | None:
    """Visible pixels per object, or None when one is too hidden (classes are unique within a scene)."""
    mask = _render_mask(objects, size)
    alone = [int((_render_mask([o], size) > 0).sum()) for o in objects]
    counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
    vis = [int(counts[CLASSES.index(o.cls)]) for o in objects]
    min_px = MIN_PIXELS * (size / 224) ** 2
    if any(v < MIN_VISIBLE * a or v < min_px for v, a in zip(vis, alone, strict=True)):
        return None
    return vis


def sample_scene(seed: int, split: str, index: int, size: int = 224) -> Scene:
    """The scene of one item: a pure function of its arguments (numpy's PCG64 stream is stable across versions)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    classes = rng.choice(len(WORLD_CLASSES), size=n, replace=False)
    scale = size / 224
    objects: list[Placed] = []
    vis: list[int] = [0]
    for c in classes:
        cls = WORLD_CLASSES[int(c)]
        choices, max_rot, mirror = SHAPES[cls][1], SHAPES[cls][2], SHAPES[cls][3]
        for _ in range(25):
            lo, hi = EXTENT
            extent = min(rng.uniform(lo, hi - 15 * (n - 1)) * SIZE_BOOST.get(cls, 1.0), hi) * scale
            colour, rgb = _colour(rng, choices, bg)
            margin = 0.35 * extent
            obj = Placed(
                cls,
                colour,
                rgb,
                cx=float(rng.uniform(margin, size - margin)),
                cy=float(rng.uniform(margin, size - margin)),
                size=float(extent),
                angle=float(rng.uniform(-max_rot, max_rot)),
                aspect=float(rng.uniform(0.85, 1.15)),
                flip=bool(mirror and rng.random() < 0.5),
            )
            got = _visible([*objects, obj], size)
            if got is not None:
                objects.append(obj)
                vis = got
                break
    if not objects:  # not reached in practice: one object alone always fits; keep the function total anyway
        raise PipeError(f"world: could not place an object in item {index} of split {split} (seed {seed})")
    return Scene(bg, tuple(objects), tuple(vis), int(rng.integers(2**31)))


def render(scene: Scene, size: int = 224) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and its exact class-index mask (0 = background, CLASSES order, no void pixels)."""
    rng = np.random.default_rng(scene.texture_seed)
    img = background(scene.background, size, rng)
    mask = np.zeros((size, size), np.uint8)
    for obj in scene.objects:
        draw_object(img, mask, obj, CLASSES.index(obj.cls), rng)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB"), mask


# --------------------------------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(obj: Placed, size: int) -> str:
    x, y = obj.cx / size, obj.cy / size
    if x < 0.36:
        return "on the left"
    if x > 0.64:
        return "on the right"
    return "at the top" if y < 0.36 else "at the bottom" if y > 0.64 else "in the middle"


def _size_word(obj: Placed, size: int) -> str:
    extent = obj.size * 224 / size
    return "small" if extent < SMALL else "large" if extent > LARGE else ""


# Phrase markup inside a caption while it is built: OPEN <entity> MID <phrase> CLOSE (control characters that no
# caption contains); `_unmark` turns it into plain text and Phrase spans.
OPEN, MID, CLOSE = "\x01", "\x02", "\x03"


def _mark(text: str, entity: int) -> str:
    return f"{OPEN}{entity}{MID}{text}{CLOSE}"


def _unmark(marked: str) -> tuple[str, tuple[Phrase, ...]]:
    """Plain caption text and the spans of its marked phrases."""
    out, phrases, pos = [], [], 0
    for part in marked.split(OPEN):
        if MID in part:
            entity, rest = part.split(MID, 1)
            phrase, tail = rest.split(CLOSE, 1)
            phrases.append(Phrase(pos, pos + len(phrase), int(entity)))
            part = phrase + tail
        out.append(part)
        pos += len(part)
    return "".join(out), tuple(phrases)


def _np_marked(
    obj: Placed, rng: np.random.Generator, size: int, colour_p: float = 0.6, size_p: float = 0.3, entity: int = 0
) -> str:
    """A phrase like "a small red ball": the noun always, colour and size sometimes; marked as `entity`."""
    words = []
    if _size_word(obj, size) and rng.random() < size_p:
        words.append(_size_word(obj, size))
    if rng.random() < colour_p:
        words.append(obj.colour)
    return _mark(_article(" ".join([*words, obj.cls])), entity)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_captions(scene: Scene, rng: np.random.Generator, size: int = 224) -> list[tuple[str, tuple[Phrase, ...]]]:
    """3-5 distinct captions, each with its phrases (entity = object index + 1, as `World.load_boxes` numbers
    them); the first names every object, the others vary form and focus."""
    objs = list(scene.objects)
    prep, bg_np, _ = BACKGROUNDS[scene.background]
    n = len(objs)

    def ent(o: Placed) -> int:
        return objs.index(o) + 1

    def _np(o: Placed, rng: np.random.Generator, size: int, colour_p: float = 0.6, size_p: float = 0.3) -> str:
        return _np_marked(o, rng, size, colour_p, size_p, ent(o))

    def all_objects() -> str:
        return _join([_np(o, rng, size) for o in rng.permutation(objs)])

    def one() -> Placed:
        return objs[int(rng.integers(n))]

    forms = [
        lambda: f"{all_objects()} {prep}",
        lambda: f"a picture of {all_objects()}",
        lambda: f"{NUMBER[n]} object{'s' if n > 1 else ''}: {all_objects()}",
        lambda: f"{bg_np} with {all_objects()}",
        lambda: f"there {'is' if n == 1 else 'are'} {all_objects()} in this image",
        lambda: (lambda o: f"there is {_np(o, rng, size, 0.7, 0.8)} {_where(o, size)}")(one()),
        lambda: (lambda o: f"{_np(o, rng, size, 0.9)} {_where(o, size)}")(one()),
        lambda: (lambda o: f"{_mark(f'the {o.cls}', ent(o))} is {_where(o, size)}")(one()),
        lambda: (lambda o: f"a close-up of {_np(o, rng, size)} {prep}")(one()),
    ]
    if n > 1:
        forms += [lambda: _relation(objs, rng, size, ent), lambda: _relation(objs, rng, size, ent)]
    want = int(rng.integers(3, 6))
    out = [forms[int(rng.integers(5))]()]
    for _ in range(50):
        if len(out) == want:
            break
        text = forms[int(rng.integers(len(forms)))]()
        if text not in out:
            out.append(text)
    plain = [_unmark(t + ".") for t in out]
    return [(text[0].upper() + text[1:], phrases) for text, phrases in plain]


def _relation(objs: list[Placed], rng: np.random.Generator, size: int, ent: Callable[[Placed], int]) -> str:
    a, b = (objs[int(i)] for i in rng.choice(len(objs), 2, replace=False))
    if abs(a.cx - b.cx) > abs(a.cy - b.cy):
        rel = "to the left of" if a.cx < b.cx else "to the right of"
    else:
        rel = "above" if a.cy < b.cy else "below"
    return f"{_np_marked(a, rng, size, 0.4, entity=ent(a))} {rel} {_np_marked(b, rng, size, 0.4, entity=ent(b))}"


# ---------------------------------------------------------------------------------------------------- dataset


def _class_names(unseen: str | None) -> tuple[str, ...]:
    """The `unseen` option as world class names; an unknown name lists the valid ones."""
    if unseen is None or not str(unseen).strip():
        return ()
    names = tuple(n.strip() for n in str(unseen).split(",") if n.strip())
    bad = [n for n in names if n not in WORLD_CLASSES]
    if bad:
        raise PipeError(f"dataset 'world': option unseen names {bad[0]!r}, not a class ({', '.join(WORLD_CLASSES)})")
    if len(set(names)) == len(WORLD_CLASSES):
        raise PipeError("dataset 'world': option unseen leaves no class seen")
    return names


@register_dataset("world")
class World(Dataset):
    """The procedural world; root is ignored. Items are "<split>_<index>"; label = the largest object's class."""

    splits = tuple(SPLIT_CODES)
    labelled = True
    background = 0  # CLASSES[0]; masks have no void pixels

    @classmethod
    def seen_classes(cls, options: dict) -> list[str] | None:
        unseen = _class_names(options.get("unseen"))
        return [c for c in WORLD_CLASSES if c not in unseen] if unseen else None

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        *,
        seed: int = 0,
        size: int | None = None,
        image_size: int = 224,
        unseen: str | None = None,
    ) -> None:
        """`unseen` ("moon,cup,key"): leave out every item whose scene shows one of these classes, so that training
        captions never name them (the unseen-classes protocol, docs/claims.md); kept items keep their ids."""
        super().__init__(root, split)
        self.unseen = _class_names(unseen)
        self.seed = int_option(self.name, "seed", seed, 0)
        self.image_size = int_option(self.name, "image_size", image_size, 112, MAX_IMAGE_SIZE)
        self.count = DEFAULT_SIZES[split] if size is None else int_option(self.name, "size", size, 0, MAX_SIZE)
        self.classes = list(CLASSES)
        self._scenes: list[Scene] | None = None
        self._index: list[int] = []  # split index of each kept item (all of them unless `unseen` leaves some out)
        self._lock = threading.Lock()
        self._last: tuple[int, Image.Image, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        """Picklable for dask workers: the lock and the last drawn item stay behind (scenes travel)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_last")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _last=None)

    def scenes(self) -> list[Scene]:
        """Scene parameters of the whole split (small: a few numbers per object), computed once on first use."""
        with self._lock:
            if self._scenes is None:
                every = [sample_scene(self.seed, self.split, i, self.image_size) for i in range(self.count)]
                self._index = [i for i, s in enumerate(every) if not {o.cls for o in s.objects} & set(self.unseen)]
                self._scenes = [every[i] for i in self._index]
            return self._scenes

    def images(self) -> list[ImageRecord]:
        scenes = self.scenes()
        return [ImageRecord(f"{self.split}_{i:05d}", s.label) for i, s in zip(self._index, scenes, strict=True)]

    def render(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Image and mask of item i; the last one is kept so that load_image then load_mask draws once."""
        last = self._last
        if last is not None and last[0] == i:
            return last[1].copy(), last[2].copy()
        img, mask = render(self.scenes()[i], self.image_size)
        self._last = (i, img, mask)
        return img.copy(), mask.copy()

    def load_image(self, i: int) -> Image.Image:
        return self.render(i)[0]

    def has_masks(self) -> bool:
        return True

    def load_mask(self, i: int) -> np.ndarray:
        return self.render(i)[1]

    def captions(self) -> list[Caption] | None:
        out = []
        for i, scene in enumerate(self.scenes()):
            rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], self._index[i], 1])
            for j, (text, phrases) in enumerate(scene_captions(scene, rng, self.image_size)):
                out.append(Caption(f"{self.split}_{self._index[i]:05d}#{j}", text, i, phrases))
        return out

    def has_boxes(self) -> bool:
        return True

    def load_boxes(self, i: int) -> Grounding:
        """Entity k + 1 = object k of the scene, typed by its class; its box is the tight box of its visible pixels
        in the exact mask (half-open pixels), so an object partly covered gets the box of what can be seen."""
        scene, mask = self.scenes()[i], self.render(i)[1]
        entities = {}
        for k, obj in enumerate(scene.objects):
            ys, xs = np.nonzero(mask == CLASSES.index(obj.cls))
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            entities[k + 1] = Entity((obj.cls,), (box,))
        return Grounding(self.image_size, self.image_size, entities)
