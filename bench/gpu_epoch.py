"""PAL epoch rows of the GPU check: one training epoch over 82,783 pairs (COCO train) of ViT-S shapes (image: CLS +
256 patches = T 257, D 384; text: L 32, D 384; K 512, batch 4096), random float16 stores written into a temp folder,
the same `Trainer` as `pipe align`. Resident: the tokens loaded onto the device once (not timed), then whole epochs
timed. Streamed: the same epoch read from the Zarr stores block by block (--memory-budget 0). The FLOP floor is the
three GEMMs per token a step needs (forward, the backward's recomputation, the anchor gradient), 2*K*D FLOPs each,
over every image and text token, at the bf16 matmul rate measured on this device.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gpu_table import Table

from pipe_align.align.base import TrainingData
from pipe_align.align.data import PairSource, find_pair_stores, keep_freed_host_memory, pair_split
from pipe_align.align.loop import RunConfig, Trainer
from pipe_align.align.pal import PAL, PALConfig
from pipe_align.extract.store import StoreLayout, create_store, default_rows

REAL = dict(pairs=82_783, grid=16, length=32, dim=384, anchors=512, batch=4096)
TINY = dict(pairs=256, grid=4, length=8, dim=24, anchors=16, batch=64)


def write_stores(root: Path, pairs: int, grid: int, length: int, dim: int) -> None:
    """Image and caption stores of `pairs` rows; shards written in parallel (each shard by one writer). The random
    rows come from one block, each shard a different window of it: generating 16 GB of normals would dominate."""
    rng = np.random.default_rng(0)
    for modality, tokens in (("image", grid * grid), ("text", length)):
        chunk, shard = default_rows(tokens, dim, pairs)
        block = rng.standard_normal((shard + 97, tokens, dim), dtype=np.float32).astype(np.float16)
        enc = {"alias": f"rand-{modality}", "modality": modality, "dim": dim, "layer": "last"}
        lay = StoreLayout(
            modality=modality,
            encoder=enc,
            dataset="coco-like",
            split="train",
            count=pairs,
            tokens=tokens,
            dim=dim,
            rows_per_chunk=chunk,
            rows_per_shard=shard,
            grid=(grid, grid) if modality == "image" else None,
        )
        st = create_store(root / f"rand-{modality}.zarr", lay)

        def write(s: int, st=st, lay=lay, block=block, modality=modality) -> None:
            a, b = lay.shard_range(s)
            off = s % 97
            ids = np.array([str(i) for i in range(a, b)])
            rows = {"ids": ids, "cls" if modality == "image" else "pooled": block[off : off + b - a, 0].copy()}
            rows["patches" if modality == "image" else "tokens"] = block[off : off + b - a]
            if modality == "text":
                lens = np.random.default_rng(s).integers(8, length + 1, b - a)
                rows |= {"text": ids, "item": np.arange(a, b), "length": lens}
            st.write_shard(s, rows, np.zeros(b - a, bool))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, range(lay.num_shards)))
        st.finalize()


def epoch_seconds(stores, split, cfg: PALConfig, batch: int, device: str, budget: int | None, reps: int) -> float:
    """Median seconds of whole training epochs after one warm-up epoch (the load, autotune, first-read checks)."""
    src = PairSource(stores, split.train, split.captions, tokens=True, device=device, memory_budget=budget)
    assert src.in_memory == (budget is None), "the resident epoch must fit the device memory"
    run = RunConfig(batch_size=batch, epochs=100_000, patience=0, val_fraction=0.0)
    trainer = Trainer(PAL, cfg, run, TrainingData(src))
    trainer.train_epoch()
    times = []
    for rep in range(reps):
        trainer.epoch = rep + 1  # a new caption draw and order each time
        t0 = time.perf_counter()
        trainer.train_epoch()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(table: Table, device: str, tiny: bool, tmp: Path, results: dict) -> None:
    s = TINY if tiny else REAL
    keep_freed_host_memory()  # as `pipe align` does
    t0 = time.perf_counter()
    write_stores(tmp, s["pairs"], s["grid"], s["length"], s["dim"])
    table.notes.append(f"epoch stores ({s['pairs']} pairs): written in {time.perf_counter() - t0:.1f} s")
    stores = find_pair_stores(tmp)
    split = pair_split(stores, 0.0, 0)
    cfg = PALConfig(anchors=s["anchors"], use_cls=True)  # the authors train on CLS + patches (T = 257)
    resident = epoch_seconds(stores, split, cfg, s["batch"], device, None, reps=2)
    rate = results.get("matmul_tflops")
    if rate is None:  # the Triton section did not measure it: the same GEMM here
        from gpu_kernel import matmul_tflops

        rate = matmul_tflops(s["batch"] * (s["grid"] ** 2 + 1), s["dim"], s["anchors"], device, 5)
    tokens = s["grid"] ** 2 + 1 + s["length"]
    floor = 3 * 2.0 * s["anchors"] * s["dim"] * tokens * len(split.train) / (rate * 1e12)
    table.set(
        "epoch-resident",
        f"{resident:.3f} s = {resident / floor:.1f}x floor {floor:.3f} s "
        f"({len(split.train) / resident:.0f} pairs/s, matmul {rate:.3g} TFLOP/s)",
        resident <= 3 * floor,
    )
    streamed = epoch_seconds(stores, split, cfg, s["batch"], device, 0, reps=1)
    table.set("epoch-streamed", f"{streamed:.3f} s = {streamed / resident:.2f}x resident", streamed <= 1.15 * resident)
