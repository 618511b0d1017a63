"""Extraction throughput: `pipe extract` end to end versus a bare forward loop of the same model, batch and device.

    python bench/extract.py [--encoder dinov2-small] [--images 96] [--batch-size 16] [--reps 3]

Both run on the same world images with the encoder already loaded. The baseline is the model's forward alone on
pre-decoded, pre-processed tensors (the upper bound for any pipeline); `pipe extract` adds decoding, preprocessing,
fp16 conversion, zstd compression and Zarr writes, overlapped with the forward. Reports medians over --reps runs,
their ratio (goal >= 0.85), and bytes on disk per row against raw fp16 size.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.job import cached_encoder
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="dinov2-small")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

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
                encoder=args.encoder, dataset="world", split="train", features=str(out), batch_size=args.batch_size,
                device=args.device, options=opts, resize="crop",
            )  # fmt: skip
            t0 = time.perf_counter()
            summary = run_extract(cfg, progress=False)
            piped.append(args.images / (time.perf_counter() - t0))
        store = open_store(summary.path)
        info = store.info()
        raw = (store.layout.tokens + 1) * store.layout.dim * 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    b, p = statistics.median(bare), statistics.median(piped)
    print(f"encoder {enc.info.weights} | {args.images} world images {enc.info.image_size}px | batch {args.batch_size}"
          f" | device {args.device} | torch threads {torch.get_num_threads()} | reps {args.reps}")
    print(f"bare forward loop      {b:7.2f} rows/s   (runs: {', '.join(f'{x:.2f}' for x in bare)})")
    print(f"pipe extract (to zarr) {p:7.2f} rows/s   (runs: {', '.join(f'{x:.2f}' for x in piped)})")
    print(f"ratio extract / bare   {p / b:7.3f}   (goal >= 0.85)")
    per_row = info["bytes_on_disk"] / info["rows"]
    print(f"bytes on disk per row  {per_row:9.0f} vs raw fp16 {raw} (cls + {store.layout.tokens} patches x"
          f" {store.layout.dim}): {per_row / raw:.3f}x")


if __name__ == "__main__":
    main()
