"""COCO 2014 captions and Karpathy's COCO split, as the authors distribute them.

Layout (one folder serves both readers, as on disk after unpacking the official zips and caption_datasets.zip):
    ROOT/annotations/captions_train2014.json, captions_val2014.json   {info, images, licenses, annotations}
    ROOT/train2014/COCO_train2014_000000xxxxxx.jpg, ROOT/val2014/COCO_val2014_000000xxxxxx.jpg
    ROOT/dataset_coco.json   {images: [{filepath, sentids, filename, imgid, split, sentences, cocoid}], dataset}
Karpathy: train = every train2014 image, val / test / restval = val2014 images. Captions are COCO's (5 per image,
one image with 6, trailing spaces and newlines as in the real files). Images: RGB JPEGs of varied sizes, plus a
grayscale and a CMYK one (both occur in the real sets).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("coco", "coco-karpathy")
TRAIN, VAL = 24, 14  # images in train2014 / val2014
KARPATHY_VAL, KARPATHY_TEST = 2, 8  # the rest of val2014 is restval
INFO = {
    "description": "This is stable 1.0 version of the 2014 MS COCO dataset.",
    "url": "http://mscoco.org",
    "version": "1.0",
    "year": 2014,
    "contributor": "Microsoft COCO group",
    "date_created": "2015-01-27 09:11:52.357475",
}
LICENSES = [
    {
        "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
        "id": 1,
        "name": "Attribution-NonCommercial-ShareAlike License",
    }
]

OBJECTS = ("cat", "dog", "bird", "horse", "car", "bus", "boat", "person", "table", "chair", "tree", "house")
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "brown", "pink")
PLACES = ("on the grass", "near the river", "in the field", "next to the house", "under the tree", "on the road")


def caption(seed: int) -> str:
    rng = np.random.default_rng(seed)
    c, o, p = (rng.choice(len(x)) for x in (COLOURS, OBJECTS, PLACES))
    return f"A {COLOURS[c]} {OBJECTS[o]} {PLACES[p]}."


def write_jpeg(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> Path:
    """A smooth random picture saved as a JPEG in `mode` (RGB, L for grayscale, CMYK)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path, "JPEG", quality=90)
    return path


def cocoid(split: str, i: int) -> int:
    return (57870 if split == "train" else 391895) + 7919 * i


def file_name(split: str, i: int) -> str:
    return f"COCO_{split}2014_{cocoid(split, i):012d}.jpg"


def captions_of(split: str, i: int) -> list[str]:
    n = 6 if (split, i) == ("train", 3) else 5
    texts = [caption(cocoid(split, i) * 10 + j) for j in range(n)]
    texts[0] += " "  # real COCO captions carry trailing spaces and newlines
    texts[-1] += "\n"
    return texts


def build(root: Path, name: str) -> Path:
    if name not in NAMES:
        raise KeyError(name)
    root.mkdir(parents=True, exist_ok=True)
    sent = 0
    karpathy = []
    for split, count in (("train", TRAIN), ("val", VAL)):
        images, anns = [], []
        for i in range(count):
            w, h = 64 + 8 * (i % 5), 48 + 6 * (i % 3)
            mode = "L" if (split, i) == ("train", 5) else "CMYK" if (split, i) == ("val", 1) else "RGB"
            write_jpeg(root / f"{split}2014" / file_name(split, i), w, h, cocoid(split, i), mode)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name(split, i),
                    "coco_url": f"http://images.cocodataset.org/{split}2014/{file_name(split, i)}",
                    "height": h,
                    "width": w,
                    "date_captured": "2013-11-14 16:28:13",
                    "flickr_url": f"http://farm4.staticflickr.com/{cocoid(split, i)}.jpg",
                    "id": cocoid(split, i),
                }
            )
            texts = captions_of(split, i)
            ids = list(range(sent, sent + len(texts)))
            sent += len(texts)
            anns += [{"image_id": cocoid(split, i), "id": s, "caption": t} for s, t in zip(ids, texts)]
            if split == "train":
                kp = "train"
            else:
                kp = "val" if i < KARPATHY_VAL else "test" if i < KARPATHY_VAL + KARPATHY_TEST else "restval"
            imgid = len(karpathy)
            sentences = [
                {"tokens": t.strip().rstrip(".").lower().split(), "raw": t, "imgid": imgid, "sentid": s}
                for s, t in zip(ids, texts)
            ]
            karpathy.append(
                {
                    "filepath": f"{split}2014",
                    "sentids": ids,
                    "filename": file_name(split, i),
                    "imgid": imgid,
                    "split": kp,
                    "sentences": sentences,
                    "cocoid": cocoid(split, i),
                }
            )
        anns.reverse()  # the real files are not grouped by image
        (root / "annotations").mkdir(exist_ok=True)
        data = {"info": INFO, "images": images, "licenses": LICENSES, "annotations": anns}
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(data))
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    return root
