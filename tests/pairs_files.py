"""The same image-caption pairs written in the containers people keep them in (for the pairs readers' tests and
bench/extract.py): an open_clip CSV, a Hugging Face imagefolder with metadata.jsonl, WebDataset tar shards as
img2dataset writes them, parquet files as Hugging Face exports them. Image bytes are copied, never re-encoded, so
every container holds byte-identical images."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Pair:
    key: str
    data: bytes  # encoded image file
    suffix: str  # ".jpg", ".png"
    captions: tuple[str, ...]


def make_pairs(n: int, seed: int = 0, size: int = 40) -> list[Pair]:
    """n random images: every third a PNG, the others JPEG; sizes vary (non-square); 1-3 captions each."""
    rng = np.random.default_rng(seed)
    words = "a red blue small large cat dog tree house car boat on the left right near photo of".split()
    out = []
    for i in range(n):
        w, h = size + int(rng.integers(-12, 24)), size + int(rng.integers(-12, 12))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        suffix = ".png" if i % 3 == 0 else ".jpg"
        img.save(buf, format="PNG" if suffix == ".png" else "JPEG", quality=90)
        caps = tuple(" ".join(rng.choice(words, size=int(rng.integers(3, 8)))) for _ in range(1 + i % 3))
        out.append(Pair(f"{i:06d}", buf.getvalue(), suffix, caps))
    return out


def _files(folder: Path, pairs: list[Pair]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for p in pairs:
        (folder / f"{p.key}{p.suffix}").write_bytes(p.data)


def write_csv(out: Path, pairs: list[Pair], sep: str = ",") -> Path:
    """open_clip's layout: `filepath` and `title` columns, one row per caption, paths relative to the table."""
    _files(out, pairs)
    table = out / "pairs.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["filepath", "title"])
        for p in pairs:
            for c in p.captions:
                w.writerow([f"{p.key}{p.suffix}", c])
    return table


def write_imagefolder(out: Path, pairs: list[Pair], split: str = "train") -> Path:
    """Hugging Face imagefolder: <split>/metadata.jsonl with `file_name` and `text`, one line per caption."""
    _files(out / split, pairs)
    lines = [json.dumps({"file_name": f"{p.key}{p.suffix}", "text": c}) for p in pairs for c in p.captions]
    (out / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(out: Path, pairs: list[Pair], shards: int = 2) -> list[Path]:
    """img2dataset's layout: KEY.jpg|png, KEY.txt (first caption), KEY.json (all of them under `captions`)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(pairs) // shards)
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for p in pairs[s * per : (s + 1) * per]:
                tar_member(tar, f"{p.key}{p.suffix}", p.data)
                tar_member(tar, f"{p.key}.txt", p.captions[0].encode())
                tar_member(tar, f"{p.key}.json", json.dumps({"key": p.key, "captions": list(p.captions)}).encode())
        paths.append(path)
    return paths


def write_parquet(out: Path, pairs: list[Pair], files: int = 2, row_group_size: int = 3) -> list[Path]:
    """Hugging Face's image feature: `image` = {bytes, path}; one row per caption (`text`), `key` names the image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    paths = []
    per = -(-len(pairs) // files)
    for k in range(files):
        part = pairs[k * per : (k + 1) * per]
        rows = [(p, c) for p in part for c in p.captions]
        table = pa.table(
            {
                "image": pa.array([{"bytes": p.data, "path": f"{p.key}{p.suffix}"} for p, _ in rows], image_type),
                "text": [c for _, c in rows],
                "key": [p.key for p, _ in rows],
            }
        )
        path = out / f"train-{k:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_all(out: Path, pairs: list[Pair]) -> dict[str, tuple[str, str, tuple[tuple[str, str], ...]]]:
    """Every container under `out`: format -> (dataset name, --root, -o options) that read it back."""
    write_csv(out / "csv", pairs)
    write_imagefolder(out / "imagefolder", pairs)
    write_webdataset(out / "wds", pairs)
    write_parquet(out / "parquet", pairs)
    return {
        "csv": ("csv", str(out / "csv" / "pairs.csv"), ()),
        "imagefolder": ("imagefolder", str(out / "imagefolder"), ()),
        "webdataset": ("webdataset", str(out / "wds" / "{00000..00001}.tar"), (("json_key", "captions"),)),
        "parquet": ("parquet", str(out / "parquet"), (("id_key", "key"),)),
    }
