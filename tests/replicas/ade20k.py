"""ADE20K SceneParsing as ADEChallengeData2016.zip unpacks: ADEChallengeData2016/{images,annotations}/{training,
validation}/ADE_{train,val}_<8 digits>.{jpg,png} (grey index PNGs, 0 = other/unlabelled, 1..150), objectInfo150.txt
and sceneCategories.txt beside them."""

from __future__ import annotations

from pathlib import Path

from tests.replicas.voc import grey_png, label_map, size_of, write_jpg

NAMES = ("ade20k",)
COUNTS = {"training": 3, "validation": 3}


def build(root: Path, name: str = "ade20k") -> Path:
    base = Path(root) / "ADEChallengeData2016"
    scenes = []
    seed = 0
    for folder, n in COUNTS.items():
        tag = "train" if folder == "training" else "val"
        for k in range(1, n + 1):
            stem = f"ADE_{tag}_{k:08d}"
            write_jpg(base / "images" / folder / f"{stem}.jpg", seed, size_of(seed))
            grey_png(base / "annotations" / folder / f"{stem}.png", label_map(seed, size_of(seed), 151, False))
            scenes.append(f"{stem} bathroom")
            seed += 1
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
    (base / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")
    return Path(root)
