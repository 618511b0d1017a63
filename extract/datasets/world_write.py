"""Write the procedural world to disk in real layouts (VOC segmentation, COCO captions), so that the whole pipeline,
readers included, can be exercised end to end on it without any download."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from ..errors import PipeError
from .base import Caption, Grounding, voc_palette
from .voc import CLASSES_FILE
from .world import World

LAYOUTS = ("voc", "coco", "flickr30k-entities")
JPEG_QUALITY = 95  # with 4:4:4 chroma: object colours stay crisp at their edges, files stay small


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def write_world(
    out_dir: str | Path,
    split: str,
    size: int | None = None,
    seed: int = 0,
    layouts: tuple[str, ...] = LAYOUTS,
    image_size: int = 224,
) -> Path:
    """Write one split of the world under out_dir and return out_dir; call once per split, same out_dir.

    voc:  out_dir/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette indices, VOC
          palette), ImageSets/Segmentation/<split>.txt, classes.txt (the world's class names, one per line)}
    coco: out_dir/{annotations/captions_<split>2017.json, <split>2017/<id>.jpg}
    flickr30k-entities: out_dir/{flickr30k_entities/{Sentences/<id>.txt, Annotations/<id>.xml, <split>.txt},
          flickr30k-images/<id>.jpg}: every object a caption names is a marked phrase `[/EN#<k>/<class> ...]`
          (entity k = object k - 1 of the scene), its box the tight box of its visible pixels
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

    f30k = out / "flickr30k_entities"
    if "flickr30k-entities" in layouts:
        for sub in ("Sentences", "Annotations"):
            (f30k / sub).mkdir(parents=True, exist_ok=True)
        (out / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    by_item: dict[int, list] = {}
    for c in world.captions() or []:
        by_item.setdefault(c.item, []).append(c)

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
        if "flickr30k-entities" in layouts:
            (out / "flickr30k-images" / f"{rec.id}.jpg").write_bytes(data)
            g = world.load_boxes(i)
            lines = [marked_sentence(c, g) for c in by_item.get(i, [])]
            (f30k / "Sentences" / f"{rec.id}.txt").write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
            (f30k / "Annotations" / f"{rec.id}.xml").write_text(annotation_xml(rec.id, g), encoding="utf-8")

    if "voc" in layouts:
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{r.id}\n" for r in records))
    if "flickr30k-entities" in layouts:
        (f30k / f"{split}.txt").write_text("".join(f"{r.id}\n" for r in records))
    if "coco" in layouts:
        base = (list(World.splits).index(split) + 1) * 1_000_000  # image ids unique across splits, like COCO's
        images = [
            {"id": base + i, "file_name": f"{r.id}.jpg", "height": image_size, "width": image_size}
            for i, r in enumerate(records)
        ]
        anns = [
            {"id": (base + c.item) * 10 + int(c.id.rsplit("#", 1)[1]), "image_id": base + c.item, "caption": c.text}
            for c in world.captions() or []
        ]
        doc = {
            "info": {"description": f"pipe procedural world, split {split}, seed {seed}"},
            "licenses": [],
            "images": images,
            "annotations": anns,
        }
        (out / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(doc), encoding="utf-8")
    return out


def marked_sentence(caption: Caption, grounding: Grounding) -> str:
    """The caption in Flickr30k Entities markup: each phrase as `[/EN#<entity>/<type> words]`; punctuation right
    after a phrase becomes its own word (" ."), as the release tokenizes its sentences."""
    text, parts, pos = caption.text, [], 0
    for ph in caption.phrases:
        kinds = "/".join(grounding.entities[ph.entity].types)
        parts += [text[pos : ph.start], f"[/EN#{ph.entity}/{kinds} {text[ph.start : ph.stop]}]"]
        pos = ph.stop
        if pos < len(text) and not text[pos].isspace():
            parts.append(" ")
    return "".join([*parts, text[pos:]])


def annotation_xml(image_id: str, grounding: Grounding) -> str:
    """The release's annotation XML: image size, and per entity its boxes as 1-based inclusive pixels."""
    objects = []
    for entity, ent in grounding.entities.items():
        for x0, y0, x1, y1 in ent.boxes:
            coords = "".join(
                f"      <{k}>{v}</{k}>\n"
                for k, v in (("xmin", int(x0) + 1), ("ymin", int(y0) + 1), ("xmax", int(x1)), ("ymax", int(y1)))
            )
            objects.append(f"  <object>\n    <name>{entity}</name>\n    <bndbox>\n{coords}    </bndbox>\n  </object>\n")
    size = f"    <width>{grounding.width}</width>\n    <height>{grounding.height}</height>\n    <depth>3</depth>\n"
    head = f"<annotation>\n  <filename>{image_id}.jpg</filename>\n  <size>\n{size}  </size>\n"
    return f"{head}{''.join(objects)}</annotation>\n"
