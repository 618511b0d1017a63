"""PAL epoch time streaming from Zarr versus from memory, on the same stores; pairs/s.

    python bench/align.py [--pairs 1024] [--anchors 512] [--batch-size 256] [--epochs 2] [--reps 3] [--features URL]

Writes random stores with the shapes of DINOv2-S at 224 px (256 patches x 384) and MiniLM (64 tokens x 384) into a
temp folder, then times whole training epochs of the same Trainer with the data held in memory and streamed
(shard-aligned blocks read through a prefetch queue), after one warm-up epoch each (the one-time load into memory,
the first-read finiteness checks of the stream). Goal: streaming within 1.15x of memory. Medians over --reps.
Like `pipe align`, it first lets the process keep freed host memory (align.data.keep_freed_host_memory); run with
PIPE_KEEP_FREED_MEMORY=0 to measure without.

With --features URL (e.g. s3://bucket/bench, credentials and endpoint from AWS_* as for `pipe`), the same stores are
also written there, and a third mode streams them from the object store: its ratio to streaming from the local disk
is the cost of object storage (goal <= 1.3x). The stores under URL are removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipe_align.align.base import TrainingData
from pipe_align.align.data import PairSource, find_pair_stores, keep_freed_host_memory, pair_split
from pipe_align.align.loop import RunConfig, Trainer
from pipe_align.align.pal import PAL, PALConfig
from pipe_align.extract.remote import Remote, location
from pipe_align.extract.store import StoreLayout, create_store, default_rows


def write_stores(root: Path | Remote, n: int, p: int, l_text: int, d: int, shard_rows: int) -> None:
    rng = np.random.default_rng(0)
    for modality, tokens in (("image", p), ("text", l_text)):
        chunk, shard = default_rows(tokens, d, n, shard_rows)
        enc = {"alias": f"rand-{modality}", "modality": modality, "dim": d, "layer": "last"}
        lay = StoreLayout(
            modality=modality,
            encoder=enc,
            dataset="rand",
            split="train",
            count=n,
            tokens=tokens,
            dim=d,
            rows_per_chunk=chunk,
            rows_per_shard=shard,
            grid=(16, 16) if modality == "image" else None,
        )
        st = create_store(root / f"rand-{modality}.zarr", lay)
        for s in range(lay.num_shards):
            a, b = lay.shard_range(s)
            rows = {
                "ids": np.array([str(i) for i in range(a, b)]),
                "cls" if modality == "image" else "pooled": rng.standard_normal((b - a, d)).astype(np.float16),
            }
            rows["patches" if modality == "image" else "tokens"] = rng.standard_normal((b - a, tokens, d)).astype(
                np.float16
            )
            if modality == "text":
                rows |= {"text": rows["ids"], "item": np.arange(a, b), "length": rng.integers(8, l_text, b - a)}
            st.write_shard(s, rows, np.zeros(b - a, bool))
        st.finalize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--anchors", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the tokens live and the anchors train")
    ap.add_argument("--features", default=None, help="also stream the stores from this URL (s3://bucket/prefix)")
    args = ap.parse_args()
    url = location(args.features) if args.features else None
    if url is not None and (not isinstance(url, Remote) or url.exists()):
        raise SystemExit(f"--features {args.features}: give a URL where nothing exists yet")
    kept = keep_freed_host_memory()  # as `pipe align` does (PIPE_KEEP_FREED_MEMORY=0 to measure without it)
    tmp = Path(tempfile.mkdtemp(prefix="pipe-bench-align-"))
    try:
        write_stores(tmp, args.pairs, 256, 64, 384, args.shard_rows)
        stores = {"memory": find_pair_stores(tmp), "stream": find_pair_stores(tmp)}
        if url is not None:
            write_stores(url, args.pairs, 256, 64, 384, args.shard_rows)
            stores["stream-url"] = find_pair_stores(url)
        split = pair_split(stores["memory"], 0.0, 0)
        cfg = PALConfig(anchors=args.anchors)
        run = RunConfig(batch_size=args.batch_size, epochs=100_000, patience=0, val_fraction=0.0)
        times: dict[str, list[float]] = {mode: [] for mode in stores}
        trainers = {}
        for mode in stores:
            src = PairSource(
                stores[mode],
                split.train,
                split.captions,
                tokens=True,
                device=args.device,
                memory_budget=None if mode == "memory" else 0,
            )
            assert src.in_memory == (mode == "memory")
            trainers[mode] = Trainer(PAL, cfg, run, TrainingData(src))
            trainers[mode].train_epoch()  # warm-up: the one-time load (memory) and first-read checks (stream)
        for rep in range(args.reps):
            for mode, trainer in trainers.items():
                trainer.epoch = rep + 1  # a fresh caption draw and order per rep, the same for both modes
                t0 = time.perf_counter()
                trainer.train_epoch()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if url is not None and url.exists():
            url.fs.rm(url.key, recursive=True)
    m, s = statistics.median(times["memory"]), statistics.median(times["stream"])
    print(
        f"PAL epoch | {args.pairs} pairs | K={args.anchors} | batch {args.batch_size} | image 256x384, text 64x384"
        f" fp16 | {args.device} | torch threads {torch.get_num_threads()} | reps {args.reps}"
        f" | freed memory kept: {'yes' if kept else 'no'}"
    )
    for name, v in (("memory", m), ("streaming", s)):
        runs = ", ".join(f"{x:.2f}" for x in times["memory" if name == "memory" else "stream"])
        print(f"{name:10s} {v:7.2f} s/epoch  {args.pairs / v:8.1f} pairs/s  (runs: {runs})")
    paired = statistics.median(b / a for a, b in zip(times["memory"], times["stream"]))
    print(
        f"ratio streaming / memory  {s / m:.3f}  (goal <= 1.15); median of the per-rep ratios {paired:.3f}"
        " (each rep times the two modes back to back, on the same caption draw and order)"
    )
    if url is not None:
        r = statistics.median(times["stream-url"])
        paired = statistics.median(b / a for a, b in zip(times["stream"], times["stream-url"]))
        print(
            f"{'from URL':10s} {r:7.2f} s/epoch  {args.pairs / r:8.1f} pairs/s  (runs: "
            f"{', '.join(f'{x:.2f}' for x in times['stream-url'])})  {url}"
        )
        print(f"ratio URL / local streaming  {r / s:.3f}  (goal <= 1.3); median of the per-rep ratios {paired:.3f}")


if __name__ == "__main__":
    main()
