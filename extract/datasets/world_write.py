"""Write the procedural world to disk in real layouts (VOC segmentation, COCO captions), so that the whole pipeline,
readers included, can be exercised end to end on it without any download."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from pipe_align.extract.datasets.base import voc_palette
from pipe_align.extract.datasets.voc import CLASSES_FILE
from pipe_align.extract.datasets.world import World
from pipe_align.extract.errors import PipeError

LAYOUTS = ("voc", "coco")
JPEG_QUALITY = 95  # with 4:4:4 chroma: object colours stay crisp at their edges, files stay small


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def write_world(out_dir: str | Path, split: str, size: int | None = None, seed: int = 0,
                layouts: tuple[str, ...] = LAYOUTS, image_size: int = 224) -> Path:  # fmt: skip
    """Write one split of the world under out_dir and return out_dir; call once per split, same out_dir.

    voc:  out_dir/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette indices, VOC
          palette), ImageSets/Segmentation/<split>.txt, classes.txt (the world's class names, one per line)}
    coco: out_dir/{annotations/captions_<split>2017.json, <split>2017/<id>.jpg}
    Images are JPEG quality 95 (4:4:4), the format both real layouts use; masks are exact (lossless PNG).
    """
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        raise PipeError(f"write_world: unknown layout '{bad[0] if bad else ''}' (choose from: {', '.join(LAYOUTS)})")
    world = World(None, split, seed=seed, size=size, image_size=image_size)
    out = Path(out_dir)
    records = world.images()
    voc = out / "VOCdevkit" / "VOC2012"
    coco_dir = out / f"{split}2017"
    if "voc" in layouts:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (voc / sub).mkdir(parents=True, exist_ok=True)
        (voc / CLASSES_FILE).write_text("\n".join(world.classes or []) + "\n", encoding="utf-8")
    if "coco" in layouts:
        coco_dir.mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)

    palette = voc_palette()
    for i, rec in enumerate(records):
        img, mask = world.render(i)
        data = _jpeg(img)
        if "voc" in layouts:
            (voc / "JPEGImages" / f"{rec.id}.jpg").write_bytes(data)
            png = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{rec.id}.png")
        if "coco" in layouts:
            (coco_dir / f"{rec.id}.jpg").write_bytes(data)

    if "voc" in layouts:
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{r.id}\n" for r in records))
    if "coco" in layouts:
        base = (list(World.splits).index(split) + 1) * 1_000_000  # image ids unique across splits, like COCO's
        images = [{"id": base + i, "file_name": f"{r.id}.jpg", "height": image_size, "width": image_size}
                  for i, r in enumerate(records)]  # fmt: skip
        anns = [{"id": (base + c.item) * 10 + int(c.id.rsplit("#", 1)[1]), "image_id": base + c.item, "caption": c.text}
                for c in world.captions() or []]  # fmt: skip
        doc = {"info": {"description": f"pipe procedural world, split {split}, seed {seed}"}, "licenses": [],
               "images": images, "annotations": anns}  # fmt: skip
        (out / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(doc), encoding="utf-8")
    return out
