"""Benchmark of the PAL anchor-profile kernels (align/kernel.py): reference vs fused. Prints figures; not a test.

CPU: forward+backward wall time (median of --reps after one warm-up) and peak memory, each variant in a fresh
subprocess so that its RSS high-water mark (getrusage ru_maxrss) belongs to it alone. Reported: the process peak,
the RSS before the first call (runtime + inputs), and their difference, the working memory the computation itself
needed (activations, saved tensors, temporaries, gradients).
GPU (when CUDA is available): --gpu-B/T/K/D in bf16, time and torch.cuda peak memory of both variants, the
achieved TFLOP/s of forward+backward against a measured bf16 matmul.

    python bench/kernel.py                       # CPU, B=256 K=512 D=384, T=257 and T=64, fp32
    python bench/kernel.py --T 257 --reps 3 --grad anchors
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

import torch

from pipe_align.align.kernel import anchor_profiles, anchor_profiles_reference, default_block_t

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rss_now_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _inputs(b: int, t: int, k: int, d: int, dtype: torch.dtype, device: str, grad: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randn(b, t, d, generator=gen, device=device).to(dtype)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen, device=device)
    lengths[0] = t  # at least one full row: the padded tail is not skipped, every block is computed
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    anchors = torch.randn(k, d, generator=gen, device=device)
    upstream = torch.randn(b, k, generator=gen, device=device)
    tokens.requires_grad_(grad == "both")
    anchors.requires_grad_(True)
    return tokens, mask, anchors, upstream


def _step(variant: str, tokens, mask, anchors, upstream, tau: float, block_t: int | None) -> None:
    if variant == "reference":
        p = anchor_profiles_reference(tokens, mask, anchors, tau)
    else:
        p = anchor_profiles(tokens, mask, anchors, tau, block_t=block_t, compiled=variant == "compiled")
    wrt = [x for x in (tokens, anchors) if x.requires_grad]
    torch.autograd.grad(p, wrt, upstream.to(p.dtype))


def worker(args: argparse.Namespace) -> None:
    """One variant, one size, in its own process: prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    for variant in ("reference", args.worker):  # load the libraries' lazily mapped code (MKL GEMMs...) before `base`
        _step(variant, *_inputs(2, 5, 3, args.D, DTYPES[args.dtype], "cpu", args.grad), args.tau, args.block_t)
    tokens, mask, anchors, upstream = _inputs(args.B, args.T[0], args.K, args.D, DTYPES[args.dtype], "cpu", args.grad)
    base_kb = _rss_now_kb()
    times = []
    for i in range(args.reps + 1):
        t0 = time.perf_counter()
        _step(args.worker, tokens, mask, anchors, upstream, args.tau, args.block_t)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.worker, "T": args.T[0], "median_s": statistics.median(times),
                      "min_s": min(times), "base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024,
                      "work_mb": (peak_kb - base_kb) / 1024, "threads": torch.get_num_threads()}))


def cpu_section(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    print(f"CPU: B={args.B} K={args.K} D={args.D} {args.dtype} tau={args.tau} grad={args.grad} reps={args.reps} "
          f"block_t={args.block_t or 'default'} threads={args.threads or torch.get_num_threads()} "
          f"(load average before: {load:.2f})")
    head = f"{'T':>4} {'variant':>9} {'median s':>9} {'min s':>7} {'peak MB':>8} {'base MB':>8} {'work MB':>8}"
    print(head)
    for t in args.T:
        rows = {}
        for variant in ("reference", "fused") + (("compiled",) if args.compiled else ()):
            cmd = [sys.executable, __file__, "--worker", variant, "--B", str(args.B), "--T", str(t), "--K",
                   str(args.K), "--D", str(args.D), "--reps", str(args.reps), "--tau", str(args.tau), "--dtype",
                   args.dtype, "--grad", args.grad, "--threads", str(args.threads)]
            if args.block_t:
                cmd += ["--block-t", str(args.block_t)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = rows[variant] = json.loads(out.strip().splitlines()[-1])
            print(f"{t:>4} {variant:>9} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['peak_mb']:>8.0f} "
                  f"{r['base_mb']:>8.0f} {r['work_mb']:>8.0f}")
        ref, fus = rows["reference"], rows["fused"]
        bt = args.block_t or default_block_t(args.B, args.K)
        print(f"{t:>4} fused/reference: time {fus['median_s'] / ref['median_s']:.2f}x, "
              f"working memory {fus['work_mb'] / ref['work_mb']:.3f}x, process peak "
              f"{fus['peak_mb'] / ref['peak_mb']:.3f}x (block_t={bt})")
        if "compiled" in rows:
            print(f"{t:>4} compiled/reference: time {rows['compiled']['median_s'] / ref['median_s']:.2f}x "
                  "(its memory includes the compiler's, so it is not compared)")


def _cuda_time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gpu_section(args: argparse.Namespace) -> None:
    b, t, k, d = args.gpu_B, args.gpu_T, args.gpu_K, args.gpu_D
    print(f"GPU {torch.cuda.get_device_name()}: B={b} T={t} K={k} D={d} bf16 tokens, fp32 anchors, grad={args.grad}")
    n = 8192
    mat = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_s = _cuda_time(lambda: torch.mm(mat, mat), args.reps)
    mm_tflops = 2 * n**3 / mm_s / 1e12
    mat = None
    print(f"bf16 matmul {n}^3: {mm_tflops:.0f} TFLOP/s")
    tokens, mask, anchors, upstream = _inputs(b, t, k, d, torch.bfloat16, "cuda", args.grad)
    gemms = 3 if args.grad == "both" else 2  # forward R, backward dA (and dz); the fused one recomputes R once more
    for variant in ("reference", "fused"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            sec = _cuda_time(lambda v=variant: _step(v, tokens, mask, anchors, upstream, args.tau, None), args.reps)
        except torch.OutOfMemoryError:
            print(f"{variant:>9}: out of memory")
            continue
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        model = gemms * 2 * b * t * k * d / sec / 1e12
        hw = (gemms + (variant == "fused")) * 2 * b * t * k * d / sec / 1e12
        print(f"{variant:>9}: {sec * 1e3:8.1f} ms  working memory {peak:8.0f} MB  {model:6.1f} TFLOP/s model "
              f"({model / mm_tflops:.0%} of matmul), {hw:6.1f} TFLOP/s executed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--T", type=int, nargs="+", default=[257, 64])
    ap.add_argument("--K", type=int, default=512)
    ap.add_argument("--D", type=int, default=384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tau", type=float, default=0.03)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--grad", choices=["both", "anchors"], default="both",
                    help="gradients w.r.t. tokens and anchors, or anchors only (PAL training: frozen tokens)")
    ap.add_argument("--block-t", dest="block_t", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--gpu-B", dest="gpu_B", type=int, default=4096)
    ap.add_argument("--gpu-T", dest="gpu_T", type=int, default=257)
    ap.add_argument("--gpu-K", dest="gpu_K", type=int, default=512)
    ap.add_argument("--gpu-D", dest="gpu_D", type=int, default=1024)
    ap.add_argument("--no-cpu", action="store_true", help="GPU section only")
    ap.add_argument("--compiled", action="store_true", help="also time the fused path with torch.compile'd blocks")
    ap.add_argument("--worker", choices=["reference", "fused", "compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.no_cpu:
        cpu_section(args)
    if torch.cuda.is_available():
        gpu_section(args)
    else:
        print("GPU: CUDA not available, section skipped")


if __name__ == "__main__":
    main()
