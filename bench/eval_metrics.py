"""Benchmark: blocked float32 retrieval metrics vs naive dense float64 baselines (COCO-5k scale by default).

Random 512-d image embeddings, 5 captions per image made as image + Gaussian noise (so recalls are neither 0 nor 1
and the comparison of the numbers means something). Each method runs in its own fresh subprocess, so that the RSS
high-water mark (``resource.getrusage(...).ru_maxrss``) belongs to that method alone; within it the method runs
``--repeats`` times and the median wall time and median process CPU time (all threads) are reported; on a shared
machine the CPU time is the steadier of the two. Methods:

- ``blocked``: ``evaluate.metrics.retrieval_metrics`` (float32 blocks of ``--block`` queries, one top-k per block).
- ``dense64``: the whole [M, N] float64 similarity matrix, then ``torch.topk`` over it in both directions.
- ``clipbench64``: clip_benchmark's algorithm (dense scores, dense boolean positive-pair matrix, per k and per
  direction a top-k -> one-hot -> count in batches of 64 query rows), in float64.

Usage: ``python bench/eval_metrics.py [--images 5000] [--per-image 5] [--dim 512] [--repeats 3]
[--methods blocked,dense64,clipbench64]`` (clipbench64 is left out by default: about 30-100 s a run at 25k x 5k).
The load average is printed before and after: on a shared machine, timings only compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def make_data(images: int, per_image: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image rows, caption rows (image + noise of 6x its scale) and the caption -> image link, float32."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(images, dim, generator=g)
    t2i = torch.arange(images).repeat_interleave(per_image)
    txt = img[t2i] + 6.0 * torch.randn(len(t2i), dim, generator=g)
    return img, txt, t2i


def dense64(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    """Whole float64 similarity matrix in memory, top-k over it in both directions."""
    img64 = F.normalize(img.double(), dim=-1)
    txt64 = F.normalize(txt.double(), dim=-1)
    scores = txt64 @ img64.T  # [M, N] float64: 1 GB at 25k x 5k
    kmax = max(KS)
    img_hit = torch.topk(scores, kmax, dim=1).indices == t2i[:, None]
    txt_top = torch.topk(scores.T, kmax, dim=1).indices
    txt_hit = t2i[txt_top] == torch.arange(img.shape[0])[:, None]
    out = {}
    for k in KS:
        out[f"image_retrieval_recall@{k}"] = img_hit[:, :k].any(1).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = txt_hit[:, :k].any(1).double().mean().item()
    return out


def _recall_counts(scores: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """Per query row, how many positives are among the top k (clip_benchmark's one-hot formulation)."""
    top = torch.topk(scores, k, dim=1).indices
    onehot = F.one_hot(top, num_classes=scores.shape[1])  # [B, k, candidates]
    return (onehot * positives[:, None, :]).sum(dim=(1, 2))


def clipbench64(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """clip_benchmark's retrieval evaluation in float64: dense scores and positive pairs, batched one-hot top-k."""
    scores = F.normalize(txt.double(), dim=-1) @ F.normalize(img.double(), dim=-1).T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(t2i)), t2i] = True
    out = {}
    for k in KS:
        for name, s, p in (("image", scores, positives), ("text", scores.T, positives.T)):
            hits = torch.cat([_recall_counts(s[i : i + batch], p[i : i + batch], k) for i in range(0, len(s), batch)])
            out[f"{name}_retrieval_recall@{k}"] = (hits > 0).double().mean().item()
    return dict(sorted(out.items()))


def worker(method: str, args: argparse.Namespace) -> None:
    """Run one method --repeats times in this (fresh) process; print one JSON line."""
    from pipe_align.evaluate.metrics import retrieval_metrics

    img, txt, t2i = make_data(args.images, args.per_image, args.dim)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn = {
        "blocked": lambda: retrieval_metrics(img, txt, t2i, ks=KS, block=args.block),
        "dense64": lambda: dense64(img, txt, t2i),
        "clipbench64": lambda: clipbench64(img, txt, t2i),
    }[method]
    times, cpu, metrics = [], [], {}
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {"method": method, "times": times, "cpu": cpu, "rss_setup_kib": rss_setup, "rss_peak_kib": rss_peak}
    print(json.dumps(record | {"metrics": metrics}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--methods", default="blocked,dense64", help="comma list of blocked, dense64, clipbench64")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return

    root = Path(__file__).resolve().parents[1]
    m = args.images * args.per_image
    print(
        f"retrieval: {args.images} images x {m} captions, dim {args.dim}, ks {KS}, block {args.block}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for method in args.methods.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--images",
            str(args.images),
            "--per-image",
            str(args.per_image),
            "--dim",
            str(args.dim),
            "--repeats",
            str(args.repeats),
            "--block",
            str(args.block),
        ]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=None)
        if proc.returncode != 0:
            print(f"{method}: failed (rc {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["median_s"] = statistics.median(r["times"])
        r["median_cpu_s"] = statistics.median(r["cpu"])
        results[method] = r
        print(
            f"{method:>12}: {r['median_s']:8.3f} s wall (runs {', '.join(f'{t:.3f}' for t in r['times'])}), "
            f"{r['median_cpu_s']:8.3f} s CPU;  "
            f"peak RSS {r['rss_peak_kib'] / 1024:8.1f} MiB, above data setup "
            f"{(r['rss_peak_kib'] - r['rss_setup_kib']) / 1024:8.1f} MiB"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if "blocked" in results:
        base = results["blocked"]
        print("recalls (blocked):", {k: round(v, 4) for k, v in sorted(base["metrics"].items())})
        for name, r in results.items():
            if name == "blocked":
                continue
            diff = max(abs(r["metrics"][k] - v) for k, v in base["metrics"].items())
            extra_b = max(base["rss_peak_kib"] - base["rss_setup_kib"], 1)
            print(
                f"{name} / blocked: wall x{r['median_s'] / base['median_s']:.2f}, CPU "
                f"x{r['median_cpu_s'] / base['median_cpu_s']:.2f}, peak RSS "
                f"x{r['rss_peak_kib'] / base['rss_peak_kib']:.2f} (above setup "
                f"x{(r['rss_peak_kib'] - r['rss_setup_kib']) / extra_b:.2f}); max |recall diff| {diff:.2e}"
            )


if __name__ == "__main__":
    main()
