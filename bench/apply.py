"""Applying a run: `encode_image` on image files versus a bare forward of the same encoder, and `segment` latency.

    python bench/apply.py [--run demo-out/runs/pal-k512] [--images 64] [--batch-size 16] [--reps 3] [--segments 10]

The run is any run dir (after `make demo`, the chosen PAL run). The images are world val images written as JPEG
files. Bare forward: the image encoder's forward alone on pre-decoded, pre-processed tensors (the upper bound).
`encode_image(paths)`: decoding and preprocessing (prefetched in a thread, as `pipe extract` does), the forward,
fp16 rounding and the method's `image_global`. Medians over --reps, and their ratio (goal >= 0.9). Then the latency
of `segment` for one 224 px image (world val, 12 labels + the background prompt): the first call, which also
encodes the label prompts (13 labels x 8 templates), and the median of the next --segments calls, which reuse them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipe_align.extract.datasets import World, write_world
from pipe_align.extract.datasets.base import open_rgb
from pipe_align.pipelines.api import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="demo-out/runs/pal-k512")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    model = load(args.run, device=args.device, batch_size=args.batch_size)
    enc = model.image_encoder
    tmp = Path(tempfile.mkdtemp(prefix="pipe-bench-apply-"))
    try:
        write_world(tmp, "val", size=args.images, layouts=("coco",))
        paths = sorted((tmp / "val2017").glob("*.jpg"))
        decoded = [open_rgb(p) for p in paths]
        batches = [
            enc.preprocess(decoded[i : i + args.batch_size], resize=model.resize)
            for i in range(0, len(decoded), args.batch_size)
        ]
        enc.encode(batches[0])  # warm-up
        model.encode_image(paths[: args.batch_size])
        bare, api = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for px in batches:
                enc.encode(px)
            bare.append(len(paths) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            model.encode_image(paths)
            api.append(len(paths) / (time.perf_counter() - t0))

        image = decoded[0]
        labels = World(None, "val", size=1).classes[1:]
        t0 = time.perf_counter()
        model.segment(image, labels)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(args.segments):
            t0 = time.perf_counter()
            model.segment(image, labels)
            warm.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    b, a = statistics.median(bare), statistics.median(api)
    print(
        f"run {args.run} ({model.method}) | encoder {enc.info.weights} | {len(paths)} world val JPEGs, "
        f"{enc.info.image_size}px {model.resize} | batch {args.batch_size} | device {args.device} | "
        f"torch threads {torch.get_num_threads()} | reps {args.reps}"
    )
    print(f"bare forward loop         {b:7.2f} images/s   (runs: {', '.join(f'{x:.2f}' for x in bare)})")
    print(f"encode_image(paths)       {a:7.2f} images/s   (runs: {', '.join(f'{x:.2f}' for x in api)})")
    print(f"ratio encode_image / bare {a / b:7.3f}   (goal >= 0.9)")
    print(
        f"segment, one {image.width}x{image.height} image, {len(labels)} labels + background: first call "
        f"{1000 * first:.0f} ms (prompts encoded), then median {1000 * statistics.median(warm):.0f} ms "
        f"(min {1000 * min(warm):.0f}, max {1000 * max(warm):.0f}, {args.segments} calls)"
    )


if __name__ == "__main__":
    main()
