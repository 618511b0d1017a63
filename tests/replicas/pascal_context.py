"""PASCAL-Context as mmsegmentation's tools/dataset_converters/pascal_context.py leaves it next to the VOC2010 devkit:
VOCdevkit/VOC2010/{JPEGImages/*.jpg (also images in no Context split), SegmentationClassContext/*.png (grey PNGs
from Image.fromarray of uint8 labels 0..59, no void value), ImageSets/SegmentationContext/{train,val}.txt (sorted
ids)}, plus the VOC2010 devkit's own SegmentationClass/ and ImageSets/Segmentation/ that the converter leaves alone."""

from __future__ import annotations

from pathlib import Path

from tests.replicas.voc import grey_png, label_map, palette_png, size_of, write_jpg

NAMES = ("pascal-context", "pascal-context-59")
TRAIN = ("2008_000002", "2008_000003")
VAL = ("2008_000008", "2008_000019", "2008_000032")


def build(root: Path, name: str = "pascal-context") -> Path:
    year = Path(root) / "VOCdevkit" / "VOC2010"
    for seed, i in enumerate(TRAIN + VAL):
        write_jpg(year / "JPEGImages" / f"{i}.jpg", seed, size_of(seed))
        grey_png(year / "SegmentationClassContext" / f"{i}.png", label_map(seed, size_of(seed), 60, False))
    write_jpg(year / "JPEGImages" / "2007_000027.jpg", 7, (40, 30))  # VOC2010 detection image, no Context label
    palette_png(year / "SegmentationClass" / "2008_000008.png", label_map(0, size_of(2), 21, True))
    (year / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (year / "ImageSets" / "Segmentation" / "val.txt").write_text("2008_000008\n")
    sets = year / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True, exist_ok=True)
    for split, members in (("train", TRAIN), ("val", VAL)):
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in sorted(members)))
    return Path(root) / "VOCdevkit"
