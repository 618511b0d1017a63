"""Extraction throughput: `pipe extract` end to end versus a bare forward loop of the same model, batch and device;
with --formats, the containers of users' own pairs against the same images read from a folder.

    python bench/extract.py [--encoder dinov2-small] [--images 96] [--batch-size 16] [--reps 3]
    python bench/extract.py --formats [--encoder tiny] [--images 64] [--reps 3]

Both run on the same world images with the encoder already loaded. The baseline is the model's forward alone on
pre-decoded, pre-processed tensors (the upper bound for any pipeline); `pipe extract` adds decoding, preprocessing,
fp16 conversion, zstd compression and Zarr writes, overlapped with the forward. Reports medians over --reps runs,
their ratio (goal >= 0.85), and bytes on disk per row against raw fp16 size.

--formats writes the world images (JPEG, quality 95) once as an imagefolder with metadata.jsonl (the folder read,
the baseline), an open_clip CSV, two WebDataset shards and two parquet files (row groups of 100 rows). Per rep and
per container, two back-to-back runs, the folder's and the container's (which goes first alternates): `pipe
extract` of the image store, then the reader alone (every image decoded and preprocessed on the extraction's decode
threads, no encoder). Reports the median over reps of the paired ratio folder time / container time (goal >= 0.95:
a container must not slow extraction), in wall-clock time and in this process's CPU time (steadier on a shared
machine, where other processes' load moves wall-clock times by more than the difference looked for).
`--encoder tiny` extracts with a random 2-layer DINOv2, so that reading, not the forward, dominates, as it does on
a GPU.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.job import cached_encoder
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.shards import DECODE_THREADS
from pipe_align.extract.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/pairs_files.py writes the containers
from tests.pairs_files import Pair, write_csv, write_imagefolder, write_parquet, write_webdataset  # noqa: E402
from tests.tiny_models import make_tiny_dinov2  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov2-small")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--formats", action="store_true", help="containers of pairs against a folder read")
    args = ap.parse_args()
    if args.formats:
        return formats(args)

    opts = (("size", args.images),)
    ds = get_dataset("world", None, "train", **dict(opts))
    enc = cached_encoder(args.encoder, "last", None, 64, args.device)
    images = [ds.load_image(i) for i in range(args.images)]
    batches = [enc.preprocess(images[i : i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    enc.encode(batches[0])  # warm-up

    tmp = Path(tempfile.mkdtemp(prefix="pipe-bench-"))
    bare, piped = [], []
    try:
        for rep in range(args.reps):
            t0 = time.perf_counter()
            for px in batches:
                enc.encode(px)
            bare.append(args.images / (time.perf_counter() - t0))

            out = tmp / f"rep{rep}"
            cfg = ExtractConfig(
                encoder=args.encoder,
                dataset="world",
                split="train",
                features=str(out),
                batch_size=args.batch_size,
                device=args.device,
                options=opts,
                resize="crop",
            )
            t0 = time.perf_counter()
            summary = run_extract(cfg, progress=False)
            piped.append(args.images / (time.perf_counter() - t0))
        store = open_store(summary.path)
        info = store.info()
        raw = (store.layout.tokens + 1) * store.layout.dim * 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    b, p = statistics.median(bare), statistics.median(piped)
    print(
        f"encoder {enc.info.weights} | {args.images} world images {enc.info.image_size}px | batch {args.batch_size}"
        f" | device {args.device} | torch threads {torch.get_num_threads()} | reps {args.reps}"
    )
    print(f"bare forward loop      {b:7.2f} rows/s   (runs: {', '.join(f'{x:.2f}' for x in bare)})")
    print(f"pipe extract (to zarr) {p:7.2f} rows/s   (runs: {', '.join(f'{x:.2f}' for x in piped)})")
    print(f"ratio extract / bare   {p / b:7.3f}   (goal >= 0.85)")
    per_row = info["bytes_on_disk"] / info["rows"]
    print(
        f"bytes on disk per row  {per_row:9.0f} vs raw fp16 {raw} (cls + {store.layout.tokens} patches x"
        f" {store.layout.dim}): {per_row / raw:.3f}x"
    )


def _read_all(ds, enc) -> None:
    """Every image of a reader, decoded and preprocessed on the extraction's decode threads, as `pipe extract` does."""
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for img in pool.map(ds.load_image, range(len(ds))):
            enc.preprocess_one(img, resize="crop")


def formats(args: argparse.Namespace) -> None:
    world = get_dataset("world", None, "train", size=args.images)
    pairs = []
    for i, rec in enumerate(world.images()):
        buf = io.BytesIO()
        world.load_image(i).save(buf, format="JPEG", quality=95)
        caps = tuple(c.text for c in world.captions() if c.item == i)
        pairs.append(Pair(rec.id, buf.getvalue(), ".jpg", caps))
    tmp = Path(tempfile.mkdtemp(prefix="pipe-bench-formats-"))
    encoder = args.encoder
    if encoder == "tiny":  # a random 2-layer DINOv2: the forward costs little, reading dominates (as on a GPU)
        encoder = f"hf:{make_tiny_dinov2(tmp / 'tiny-dinov2')}"
    sources = {
        "folder": ("imagefolder", str(write_imagefolder(tmp / "folder", pairs)), ()),
        "csv": ("csv", str(write_csv(tmp / "csv", pairs)), ()),
        "webdataset": ("webdataset", str(write_webdataset(tmp / "wds", pairs, shards=2)[0].parent), ()),
        "parquet": (
            "parquet",
            str(write_parquet(tmp / "pq", pairs, files=2, row_group_size=100)[0].parent),
            (("id_key", "key"),),
        ),
    }
    enc = cached_encoder(encoder, "last", None, 64, args.device)
    others = [n for n in sources if n != "folder"]
    whats = ("pipe extract", "reader + preprocess")
    ratios = {w: {n: [] for n in others} for w in whats}  # wall-clock: folder / container
    cpu_ratios = {w: {n: [] for n in others} for w in whats}  # CPU time of this process (all its threads)
    rates: dict[str, dict[str, list[float]]] = {w: {n: [] for n in sources} for w in whats}
    runs = 0

    def extract_once(n: str) -> tuple[float, float]:
        nonlocal runs
        name, root, opts = sources[n]
        runs += 1
        cfg = ExtractConfig(
            encoder=encoder,
            dataset=name,
            split="train",
            root=root,
            options=opts,
            resize="crop",
            features=str(tmp / "features" / str(runs)),
            batch_size=args.batch_size,
            device=args.device,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        run_extract(cfg, progress=False)
        return time.perf_counter() - t0, time.process_time() - c0

    def read_once(n: str) -> tuple[float, float]:
        name, root, opts = sources[n]
        t0, c0 = time.perf_counter(), time.process_time()
        _read_all(get_dataset(name, root, "train", **dict(opts)), enc)
        return time.perf_counter() - t0, time.process_time() - c0

    try:
        for rep in range(args.reps):  # each ratio from two back-to-back runs, which goes first alternating
            for n in others:
                for what, once in (("pipe extract", extract_once), ("reader + preprocess", read_once)):
                    pair = ("folder", n) if rep % 2 == 0 else (n, "folder")
                    t = {m: once(m) for m in pair}
                    ratios[what][n].append(t["folder"][0] / t[n][0])
                    cpu_ratios[what][n].append(t["folder"][1] / t[n][1])
                    for m in pair:
                        rates[what][m].append(args.images / t[m][0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"encoder {enc.info.weights} | {args.images} world images as JPEG q95 | batch {args.batch_size} | device "
        f"{args.device} | torch threads {torch.get_num_threads()} | decode threads {DECODE_THREADS} | reps "
        f"{args.reps}"
    )
    for what in whats:
        print(
            f"{what} (opening the reader included): median images/s; medians of the paired ratios folder / "
            "container, wall-clock and CPU time (goal >= 0.95)"
        )
        print(f"  {'folder':<11} {statistics.median(rates[what]['folder']):8.1f} images/s")
        for n in others:
            r, c = ratios[what][n], cpu_ratios[what][n]
            print(
                f"  {n:<11} {statistics.median(rates[what][n]):8.1f} images/s   wall {statistics.median(r):6.3f}"
                f"   cpu {statistics.median(c):6.3f}   (wall runs: {', '.join(f'{x:.2f}' for x in r)})"
            )


if __name__ == "__main__":
    main()
