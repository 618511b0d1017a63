"""Drawing for the procedural world: object shapes as polygons in a unit frame, textured fills, backgrounds.

Every object is a list of polygon parts in a frame where the object spans about [-1, 1]; a scene transforms them
(scale, aspect, flip, rotation, translation) and rasterises them with PIL without antialiasing, so that the
object's pixels in the image and in the mask are exactly the same set. A part with colour HOLE cuts the object
(key ring, cup handle, crescent moon) so the background shows through and the mask says background there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

HOLE = "hole"
MAIN = "main"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (245, 205, 40),
    "green": (40, 125, 45),
    "blue": (40, 85, 205),
    "purple": (125, 55, 170),
    "pink": (240, 125, 180),
    "white": (240, 240, 232),
    "brown": (125, 75, 35),
    "gray": (145, 145, 150),
    "black": (25, 25, 28),
    "lightblue": (170, 215, 240),
    "darkbrown": (80, 45, 20),
    "roof": (150, 45, 35),
    "leaf": (60, 150, 50),
}


@dataclass(frozen=True)
class Part:
    points: np.ndarray  # [n, 2] in the unit frame, x right, y down
    colour: str  # MAIN (the object's sampled colour), HOLE, or a COLOURS key
    texture: str = "flat"  # flat | shade (lit from top-left) | stripes (bands across the unit x axis)


def circle(cx: float, cy: float, r: float, ry: float | None = None, n: int = 36) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + (r if ry is None else ry) * np.sin(t)], 1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def poly(*xy: float) -> np.ndarray:
    return np.array(xy, dtype=float).reshape(-1, 2)


def _star() -> np.ndarray:
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(t), r * np.sin(t) + 0.1], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x / 16.5, (y + 2.5) / 15.5], 1)


def _petals(n: int = 6) -> list[Part]:
    return [
        Part(circle(0.36 * np.cos(a), -0.3 + 0.36 * np.sin(a), 0.3), MAIN, "shade")
        for a in np.arange(n) * 2 * np.pi / n
    ]


# name -> (parts, main colour choices, max rotation in degrees, may be mirrored)
SHAPES: dict[str, tuple[list[Part], tuple[str, ...], float, bool]] = {
    "ball": (
        [Part(circle(0, 0, 1, n=48), MAIN, "shade"), Part(circle(-0.38, -0.38, 0.16), "white")],
        ("red", "blue", "orange"),
        180,
        False,
    ),
    "star": ([Part(_star(), MAIN, "shade")], ("yellow", "orange"), 180, False),
    "tree": (
        [
            Part(rect(-0.14, 0.35, 0.14, 1.0), "brown"),
            Part(poly(-0.8, 0.5, 0.8, 0.5, 0, -0.2), MAIN, "shade"),
            Part(poly(-0.62, 0.12, 0.62, 0.12, 0, -0.62), MAIN, "shade"),
            Part(poly(-0.45, -0.28, 0.45, -0.28, 0, -1.0), MAIN, "shade"),
        ],
        ("green",),
        12,
        True,
    ),
    "house": (
        [
            Part(rect(-0.7, -0.1, 0.7, 1.0), MAIN),
            Part(poly(-0.92, -0.08, 0.92, -0.08, 0, -0.95), "roof"),
            Part(rect(-0.16, 0.42, 0.16, 1.0), "darkbrown"),
            Part(rect(0.28, 0.12, 0.55, 0.38), "lightblue"),
            Part(rect(-0.55, 0.12, -0.28, 0.38), "lightblue"),
        ],
        ("red", "white", "yellow", "blue"),
        10,
        True,
    ),
    "car": (
        [
            Part(rect(-1.0, -0.05, 1.0, 0.5), MAIN, "shade"),
            Part(poly(-0.55, 0.0, -0.32, -0.5, 0.42, -0.5, 0.65, 0.0), MAIN, "shade"),
            Part(poly(-0.42, -0.06, -0.26, -0.4, 0.0, -0.4, 0.0, -0.06), "lightblue"),
            Part(poly(0.08, -0.06, 0.08, -0.4, 0.36, -0.4, 0.52, -0.06), "lightblue"),
            Part(circle(-0.55, 0.5, 0.27), "black"),
            Part(circle(0.55, 0.5, 0.27), "black"),
            Part(circle(-0.55, 0.5, 0.1), "gray"),
            Part(circle(0.55, 0.5, 0.1), "gray"),
        ],
        ("red", "blue", "yellow", "green"),
        12,
        True,
    ),
    "fish": (
        [
            Part(poly(0.45, 0.0, 1.0, -0.5, 1.0, 0.5), MAIN),
            Part(poly(-0.25, -0.3, 0.25, -0.3, 0.1, -0.62), MAIN),
            Part(circle(-0.1, 0, 0.72, 0.42), MAIN, "stripes"),
            Part(circle(-0.52, -0.08, 0.11), "white"),
            Part(circle(-0.55, -0.08, 0.055), "black"),
        ],
        ("orange", "blue", "yellow"),
        25,
        True,
    ),
    "flower": (
        [Part(rect(-0.06, 0.0, 0.06, 1.0), "leaf"), Part(poly(0.04, 0.75, 0.5, 0.45, 0.55, 0.5, 0.04, 0.9), "leaf")]
        + _petals()
        + [Part(circle(0, -0.3, 0.22), "yellow")],
        ("pink", "purple", "white", "red"),
        20,
        True,
    ),
    "moon": (
        [Part(circle(0, 0, 1, n=48), MAIN, "shade"), Part(circle(0.5, -0.18, 0.74, n=48), HOLE)],
        ("yellow", "white"),
        40,
        True,
    ),
    "heart": ([Part(_heart(), MAIN, "shade")], ("red", "pink", "purple"), 25, False),
    "cup": (
        [
            Part(circle(0.55, 0.05, 0.42), MAIN),
            Part(circle(0.55, 0.05, 0.22), HOLE),
            Part(poly(-0.65, -0.7, 0.5, -0.7, 0.38, 0.8, -0.53, 0.8), MAIN, "shade"),
            Part(circle(-0.075, -0.7, 0.575, 0.1), "black"),
        ],
        ("white", "blue", "red", "green"),
        12,
        True,
    ),
    "key": (
        [
            Part(circle(-0.55, 0, 0.45), MAIN),
            Part(circle(-0.55, 0, 0.2), HOLE),
            Part(rect(-0.15, -0.11, 1.0, 0.11), MAIN),
            Part(rect(0.52, 0.1, 0.68, 0.4), MAIN),
            Part(rect(0.8, 0.1, 0.96, 0.32), MAIN),
        ],
        ("yellow", "gray"),
        180,
        True,
    ),
    "boat": (
        [
            Part(rect(-0.04, -0.95, 0.04, 0.4), "brown"),
            Part(poly(0.1, -0.9, 0.1, 0.28, 0.78, 0.28), "white"),
            Part(poly(-0.1, -0.65, -0.1, 0.28, -0.6, 0.28), "white"),
            Part(poly(-1.0, 0.32, 1.0, 0.32, 0.7, 0.8, -0.7, 0.8), MAIN, "shade"),
        ],
        ("brown", "red", "blue"),
        12,
        True,
    ),
}


# ------------------------------------------------------------------------------------------------ backgrounds

# name -> (preposition phrase for "... on a grassy field", noun phrase for "a grassy field with ...", mean colour)
BACKGROUNDS: dict[str, tuple[str, str, tuple[int, int, int]]] = {
    "grass": ("on a grassy field", "a grassy field", (100, 160, 70)),
    "sand": ("on a sandy beach", "a sandy beach", (215, 190, 140)),
    "sky": ("in the blue sky", "the blue sky", (150, 190, 235)),
    "wood": ("on a wooden table", "a wooden table", (160, 115, 70)),
    "snow": ("in the snow", "a snowy field", (232, 236, 244)),
}


def _smooth(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically (cheap, no FFT)."""
    coarse = Image.fromarray(rng.random(cells, dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured HxWx3 float32 background; each kind has its own structure, not just a colour."""
    h = w = size
    base = np.array(BACKGROUNDS[kind][2], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
    low = _smooth(rng, h, w, (6, 6)) - 0.5
    fine = rng.standard_normal((h, w), dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None] / h
    if kind == "grass":
        blades = _smooth(rng, h, w, (max(h // 10, 2), w // 2)) - 0.5
        lum = 40 * low + 45 * blades + 8 * fine
        img = base + lum[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    elif kind == "sand":
        grains = (rng.random((h, w), dtype=np.float32) < 0.03) * -35
        img = base + (25 * low + 10 * fine + grains)[..., None] * np.array([1.0, 0.95, 0.8], np.float32)
    elif kind == "sky":
        clouds = np.clip((_smooth(rng, h, w, (5, 7)) - 0.55) * 4, 0, 1)[..., None]
        grad = base + (y - 0.5)[..., None] * np.array([50, 40, 15], np.float32) + 3 * fine[..., None]
        img = grad * (1 - clouds) + np.float32(245) * clouds
    elif kind == "wood":
        period = rng.uniform(0.05, 0.09)
        grain = np.sin(2 * np.pi * (y + 0.06 * low) / period) * 18
        planks = ((np.arange(w)[None, :] + int(rng.integers(0, 60))) % 60 < 2) * -45
        img = base + (grain + planks + 6 * fine)[..., None] * np.array([1.0, 0.8, 0.6], np.float32)
    else:  # snow
        img = base + (15 * low + 5 * fine)[..., None] * np.array([0.9, 0.95, 1.0], np.float32)
    return img.astype(np.float32)


# --------------------------------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Placed:
    """One object of a scene: everything needed to draw it again bit for bit."""

    cls: str
    colour: str  # the main colour's name (said in captions)
    rgb: tuple[float, float, float]  # the jittered main colour
    cx: float
    cy: float
    size: float  # extent in pixels (the unit frame's [-1, 1])
    angle: float  # degrees
    aspect: float  # x stretch
    flip: bool

    def transform(self, pts: np.ndarray) -> np.ndarray:
        x = pts[:, 0] * self.aspect * (-1 if self.flip else 1)
        y = pts[:, 1]
        a = np.deg2rad(self.angle)
        c, s = np.cos(a), np.sin(a)
        half = self.size / 2
        return np.stack([self.cx + half * (c * x - s * y), self.cy + half * (s * x + c * y)], 1)

    def to_unit(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of transform for pixel centres (textures follow the object's rotation)."""
        a = np.deg2rad(self.angle)
        c, s = np.cos(a), np.sin(a)
        dx, dy = (px - self.cx) / (self.size / 2), (py - self.cy) / (self.size / 2)
        x, y = c * dx + s * dy, -s * dx + c * dy
        return x / self.aspect * (-1 if self.flip else 1), y


def part_map(obj: Placed, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Rasterise an object's parts into a local uint8 map (k+1 = part k, 0 = not the object) and its offset."""
    parts = SHAPES[obj.cls][0]
    pts = [obj.transform(p.points) for p in parts]
    allp = np.concatenate(pts)
    x0, y0 = (max(int(np.floor(v)) - 1, 0) for v in allp.min(0))
    x1, y1 = (min(int(np.ceil(v)) + 2, size) for v in allp.max(0))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.uint8), (0, 0)
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    for k, (part, p) in enumerate(zip(parts, pts, strict=True)):
        draw.polygon([(float(x) - x0, float(y) - y0) for x, y in p], fill=0 if part.colour == HOLE else k + 1)
    return np.asarray(canvas), (x0, y0)


def draw_object(img: np.ndarray | None, mask: np.ndarray, obj: Placed, label: int, rng: np.random.Generator) -> None:
    """Paint one object over img (HxWx3 float32, may be None to build the mask only) and mask, in place."""
    pm, (x0, y0) = part_map(obj, mask.shape[0])
    if pm.size == 0:
        return
    h, w = pm.shape
    mask[y0 : y0 + h, x0 : x0 + w][pm > 0] = label
    if img is None:
        return
    region = img[y0 : y0 + h, x0 : x0 + w]
    py, px = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32) + 0.5
    ux, uy = obj.to_unit(px, py)
    noise = rng.standard_normal((h, w), dtype=np.float32) * 5
    for k, part in enumerate(SHAPES[obj.cls][0]):
        sel = pm == k + 1
        if part.colour == HOLE or not sel.any():
            continue
        rgb = np.array(obj.rgb if part.colour == MAIN else COLOURS[part.colour], np.float32)
        if part.texture == "shade":
            shade = 1.12 - 0.22 * np.hypot(ux[sel] + 0.4, uy[sel] + 0.4)
        elif part.texture == "stripes":
            shade = np.where(np.sin(ux[sel] * 9.0) > 0.3, 0.72, 1.0)
        else:
            shade = np.ones(int(sel.sum()), np.float32)
        region[sel] = rgb[None, :] * shade[:, None] + noise[sel][:, None]
