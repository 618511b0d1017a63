"""PAL data-parallel (torchrun) against one process on the same stores: epoch time, pairs/s, same anchors.

    python bench/align_ddp.py [--pairs 1024] [--ranks 2] [--epochs 4] [--device cpu]

Writes the random stores of bench/align.py (DINOv2-S / MiniLM shapes), then trains PAL twice with identical options:
`pipe align` in one process (torch's threads: all cores on CPU) and `torchrun --nproc_per_node RANKS` (on CPU each
rank gets cores / RANKS threads, gloo; on CUDA one GPU per rank, NCCL). Reports the median epoch time after the
first epoch (the one-time load) from each run.json, the ratio, and the largest anchor difference between the runs
(data parallelism must not change the result).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _write_stores(root: Path, pairs: int) -> None:
    spec = importlib.util.spec_from_file_location("bench_align", Path(__file__).with_name("align.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write_stores(root, pairs, 256, 64, 384, 256)


def _epoch_seconds(run: Path) -> list[float]:
    hist = json.loads((run / "run.json").read_text())["history"]
    return [h["seconds"] for h in hist[1:]]  # epoch 0 includes the one-time load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="pipe-bench-ddp-"))
    opts = [
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--patience",
        "0",
        "--val-fraction",
        "0",
        "--device",
        args.device,
        "--no-progress",
    ]
    try:
        _write_stores(tmp / "stores", args.pairs)
        common = ["align", "--shards", str(tmp / "stores"), *opts]
        one_env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
        subprocess.run(
            [sys.executable, "-m", "pipe_align.pipelines.cli", *common, "--out", str(tmp / "one")],
            cwd=root,
            env=one_env,
            check=True,
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        per_rank = str(max(1, cores // args.ranks)) if args.device == "cpu" else os.environ.get("OMP_NUM_THREADS", "1")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(args.ranks),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "pipe_align.pipelines.cli",
                *common,
                "--out",
                str(tmp / "ddp"),
            ],
            cwd=root,
            env={**os.environ, "OMP_NUM_THREADS": per_rank},
            check=True,
        )
        from safetensors.torch import load_file

        a, b = load_file(tmp / "one" / "anchors.safetensors"), load_file(tmp / "ddp" / "anchors.safetensors")
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        one, ddp = _epoch_seconds(tmp / "one"), _epoch_seconds(tmp / "ddp")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m1, m2 = statistics.median(one), statistics.median(ddp)
    print(
        f"PAL K=512 | {args.pairs} pairs | batch {args.batch_size} | {args.device} | {cores} cores | "
        f"epochs after the first: {len(one)}"
    )
    print(
        f"one process ({cores} threads)      {m1:7.2f} s/epoch  {args.pairs / m1:8.1f} pairs/s  "
        f"(epochs: {', '.join(f'{x:.2f}' for x in one)})"
    )
    print(
        f"torchrun {args.ranks} ranks ({per_rank} thread(s) each) {m2:7.2f} s/epoch  {args.pairs / m2:8.1f} pairs/s  "
        f"(epochs: {', '.join(f'{x:.2f}' for x in ddp)})"
    )
    print(f"speed-up one / ranks  {m1 / m2:.2f}x;  max |anchor difference| {diff:.2e}")


if __name__ == "__main__":
    main()
