"""Flickr30k with Karpathy's split file, as distributed: ROOT/dataset_flickr30k.json
{images: [{sentids, imgid, sentences: [{tokens, raw, imgid, sentid}], split, filename}], dataset} and the images in
ROOT/flickr30k-images/<flickr id>.jpg. Five captions per image; train / val / test entries interleaved as in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.replicas.coco import caption, write_jpeg

NAMES = ("flickr30k",)
SPLITS = ("train",) * 6 + ("val",) * 2 + ("test",) * 8


def build(root: Path, name: str) -> Path:
    if name not in NAMES:
        raise KeyError(name)
    root.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(SPLITS)), key=lambda i: (i * 5) % len(SPLITS))  # splits interleaved
    images, sent = [], 0
    for imgid, i in enumerate(order):
        fid = 1000092795 + 104729 * i
        write_jpeg(
            root / "flickr30k-images" / f"{fid}.jpg", 60 + 4 * (i % 4), 50 + 5 * (i % 3), fid, "L" if i == 7 else "RGB"
        )
        texts = [caption(fid * 10 + j) for j in range(5)]
        ids = list(range(sent, sent + 5))
        sent += 5
        images.append(
            {
                "sentids": ids,
                "imgid": imgid,
                "split": SPLITS[i],
                "filename": f"{fid}.jpg",
                "sentences": [
                    {"tokens": t.rstrip(".").lower().split(), "raw": t, "imgid": imgid, "sentid": s}
                    for s, t in zip(ids, texts)
                ],
            }
        )
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root
