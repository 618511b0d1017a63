"""Benchmark of the PAL anchor-profile kernels (align/kernel.py): reference vs fused. Prints figures; not a test.

CPU: forward+backward wall time and working memory of `anchor_profiles_reference` and `anchor_profiles`, and the
GEMM floor of the same work measured in the same run. Every measurement runs in a fresh subprocess (--runs of them per
variant, interleaved reference / fused / gemm so that a change in the machine's load hits all three alike), each
timing --reps calls after one warm-up; the medians are over all timed calls. Memory: the process's RSS high-water mark
(getrusage ru_maxrss) minus its RSS before the first call (runtime + inputs): the working memory the computation
itself needed (activations, saved tensors, temporaries, gradients).

GEMM floor: the kernels' unavoidable matrix products, `floor_gemms` GEMMs of 2*B*T*K*D flops (3 for --grad anchors:
forward R, its recompute and dA; 4 with the token gradient), timed at the fastest of three measured GEMM rates: one
[B*T, D] x [D, K] product (the reference's), the same work as [B*block_t, D] x [D, K] blocks (the fused path's) and as
accumulated [K, B*block_t] x [B*block_t, D] products (its dA). The fastest rate gives the lowest, strictest floor.

--load burn runs the same comparison beside a CPU burner: a child process that spins on one core (pinned to the last
CPU this process may use), started before the condition's first worker and stopped after its last.
--policy pipe (default) runs the workers under `pipe`'s thread policy (pipelines/threads.py: OMP_WAIT_POLICY=PASSIVE
unless the environment sets it, PIPE_THREADS); --policy torch under torch's own defaults (the state before it).
GPU (when CUDA is available): --gpu-B/T/K/D in bf16, time and torch.cuda peak memory of both variants, the
achieved TFLOP/s of forward+backward against a measured bf16 matmul.

    python bench/kernel.py                                  # CPU, B=256 K=512 D=384 T=257, fp32, idle and burn
    python bench/kernel.py --load idle --grad both --T 257 64 --policy torch
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
VARIANTS = ("reference", "fused", "gemm")


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


def floor_gemms(grad: str) -> int:
    return 4 if grad == "both" else 3


def _gemm_work(b: int, t: int, k: int, d: int, block_t: int):
    """Three ways to do one GEMM of 2*B*T*K*D flops (float32): whole, in the fused path's blocks, as its dA."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(b * t, d, generator=gen), torch.randn(d, k, generator=gen)
    dr, acc = torch.randn(k, b * t, generator=gen), torch.zeros(k, d)
    rows = [(r0, min(r0 + b * block_t, b * t)) for r0 in range(0, b * t, b * block_t)]

    def blocked() -> None:
        for r0, r1 in rows:
            torch.mm(x[r0:r1], w)

    def accumulated() -> None:
        for r0, r1 in rows:
            acc.addmm_(dr[:, r0:r1], x[r0:r1])

    return {"whole": lambda: torch.mm(x, w), "blocks": blocked, "dA": accumulated}


def worker(args: argparse.Namespace) -> None:
    """One variant, one size, in its own process: prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    t = args.T[0]
    out = {"variant": args.worker, "T": t, "threads": torch.get_num_threads()}
    if args.worker == "gemm":
        work = _gemm_work(args.B, t, args.K, args.D, args.block_t or default_block_t(args.B, args.K))
        times = {name: [] for name in work}
        for i in range(args.reps + 1):
            for name, fn in work.items():
                t0 = time.perf_counter()
                fn()
                if i:
                    times[name].append(time.perf_counter() - t0)
        print(json.dumps(out | {"times": times}))
        return
    for variant in ("reference", args.worker):  # load the libraries' lazily mapped code (MKL GEMMs...) before `base`
        _step(variant, *_inputs(2, 5, 3, args.D, DTYPES[args.dtype], "cpu", args.grad), args.tau, args.block_t)
    tokens, mask, anchors, upstream = _inputs(args.B, t, args.K, args.D, DTYPES[args.dtype], "cpu", args.grad)
    base_kb = _rss_now_kb()
    times = []
    for i in range(args.reps + 1):
        t0 = time.perf_counter()
        _step(args.worker, tokens, mask, anchors, upstream, args.tau, args.block_t)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            out
            | {
                "times": times,
                "base_mb": base_kb / 1024,
                "peak_mb": peak_kb / 1024,
                "work_mb": (peak_kb - base_kb) / 1024,
            }
        )
    )


def start_burner() -> subprocess.Popen:
    """A child process spinning on one core (the last one this process may run on)."""
    cpu = max(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


def stop_burner(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def worker_env(policy: str) -> dict[str, str]:
    """The workers' environment: `pipe`'s thread policy on top of this one, or this one as it is (torch defaults).
    OMP_DISPLAY_ENV makes each worker's libgomp print the settings it actually read (`_omp_settings`)."""
    env = dict(os.environ)  # copied before the import below, whose package __init__ applies the policy to os.environ
    from pipe_align.pipelines import threads

    if policy == "pipe":
        env.update(threads.policy(env))
    return env | {"OMP_DISPLAY_ENV": "VERBOSE"}


def _omp_settings(stderr: str) -> dict[str, str]:
    """Wait settings as libgomp read them when the worker loaded torch. It shows OMP_WAIT_POLICY 'PASSIVE' also when
    the variable is unset; GOMP_SPINCOUNT tells the two apart (0 under PASSIVE, 300000 by default)."""
    out = {}
    for line in stderr.splitlines():
        key, _, value = line.strip().partition(" = ")
        if key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
            out[key] = value.strip("'")
    return out


def _run_worker(args: argparse.Namespace, variant: str, t: int, env: dict[str, str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--B",
        str(args.B),
        "--T",
        str(t),
        "--K",
        str(args.K),
        "--D",
        str(args.D),
        "--reps",
        str(args.reps),
        "--tau",
        str(args.tau),
        "--dtype",
        args.dtype,
        "--grad",
        args.grad,
        "--threads",
        str(args.threads),
    ]
    if args.block_t:
        cmd += ["--block-t", str(args.block_t)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"worker {variant} T={t} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"omp": _omp_settings(proc.stderr)}


def measure(args: argparse.Namespace, t: int, env: dict[str, str]) -> dict:
    """--runs fresh processes per variant, interleaved; all timed calls pooled per variant (and per GEMM shape)."""
    variants = VARIANTS + (("compiled",) if args.compiled else ())
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.runs):
        for v in variants:
            runs[v].append(_run_worker(args, v, t, env))
    res = {"threads": runs["fused"][0]["threads"], "omp": runs["fused"][0]["omp"]}
    for v in variants:
        if v == "gemm":
            continue
        times = [x for r in runs[v] for x in r["times"]]
        res[v] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "work_mb": statistics.median(r["work_mb"] for r in runs[v]),
        }
    shapes = runs["gemm"][0]["times"]
    res["gemm"] = {name: statistics.median(x for r in runs["gemm"] for x in r["times"][name]) for name in shapes}
    flops = 2 * args.B * t * args.K * args.D
    res["gemm_gflops"] = {name: flops / sec / 1e9 for name, sec in res["gemm"].items()}
    res["floor_s"] = floor_gemms(args.grad) * min(res["gemm"].values())
    return res


def cpu_section(args: argparse.Namespace) -> dict:
    env = worker_env(args.policy)
    print(
        f"CPU: B={args.B} K={args.K} D={args.D} {args.dtype} tau={args.tau} grad={args.grad} runs={args.runs} "
        f"x reps={args.reps} block_t={args.block_t or 'default'} policy={args.policy} "
        f"threads={args.threads or 'default'}, {os.cpu_count()} CPUs"
    )
    print(f"GEMM floor = {floor_gemms(args.grad)} GEMMs of 2*B*T*K*D flops at the fastest measured GEMM rate")
    head = f"{'load':>5} {'T':>4} {'variant':>9} {'median s':>9} {'min s':>7} {'work MB':>8} {'/ref':>6} {'/floor':>7}"
    results = {}
    for load in args.load:
        burner = start_burner() if load == "burn" else None
        try:
            la0 = os.getloadavg()[0]
            for t in args.T:
                results[(load, t)] = r = measure(args, t, env)
                if t == args.T[0]:
                    print(
                        f"-- load={load}: torch threads {r['threads']}; libgomp GOMP_SPINCOUNT "
                        f"{r['omp'].get('GOMP_SPINCOUNT', '?')} (0: PASSIVE); load average before {la0:.2f}"
                    )
                    print(head)
                ref, fus = r["reference"], r["fused"]
                for v in [x for x in ("reference", "fused", "compiled") if x in r]:
                    x = r[v]
                    print(
                        f"{load:>5} {t:>4} {v:>9} {x['median_s']:>9.3f} {x['min_s']:>7.3f} {x['work_mb']:>8.0f} "
                        f"{x['median_s'] / ref['median_s']:>6.2f} {x['median_s'] / r['floor_s']:>7.2f}"
                    )
                rates = ", ".join(f"{k} {v:.0f}" for k, v in r["gemm_gflops"].items())
                whole = floor_gemms(args.grad) * r["gemm"]["whole"]
                print(
                    f"{load:>5} {t:>4} GEMM GFLOP/s: {rates}; floor {r['floor_s']:.3f} s (at the whole GEMM's rate "
                    f"{whole:.3f} s: fused/that {fus['median_s'] / whole:.2f}x)"
                )
                print(
                    f"{load:>5} {t:>4} fused/reference: time {fus['median_s'] / ref['median_s']:.2f}x, working "
                    f"memory {fus['work_mb'] / ref['work_mb']:.3f}x; fused/floor "
                    f"{fus['median_s'] / r['floor_s']:.2f}x"
                )
            print(f"-- load={load}: load average after {os.getloadavg()[0]:.2f}")
        finally:
            if burner is not None:
                stop_burner(burner)
    return results


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
        print(
            f"{variant:>9}: {sec * 1e3:8.1f} ms  working memory {peak:8.0f} MB  {model:6.1f} TFLOP/s model "
            f"({model / mm_tflops:.0%} of matmul), {hw:6.1f} TFLOP/s executed"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--T", type=int, nargs="+", default=[257])
    ap.add_argument("--K", type=int, default=512)
    ap.add_argument("--D", type=int, default=384)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per process (after one warm-up)")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per variant and load condition")
    ap.add_argument(
        "--load",
        nargs="+",
        choices=["idle", "burn"],
        default=["idle", "burn"],
        help="idle: as the machine is; burn: beside a child process spinning on one core",
    )
    ap.add_argument(
        "--policy",
        choices=["pipe", "torch"],
        default="pipe",
        help="workers under pipe's thread policy (pipelines/threads.py) or torch's own defaults",
    )
    ap.add_argument("--tau", type=float, default=0.03)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument(
        "--grad",
        choices=["both", "anchors"],
        default="anchors",
        help="gradients w.r.t. tokens and anchors, or anchors only (PAL training: frozen tokens)",
    )
    ap.add_argument("--block-t", dest="block_t", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--gpu-B", dest="gpu_B", type=int, default=4096)
    ap.add_argument("--gpu-T", dest="gpu_T", type=int, default=257)
    ap.add_argument("--gpu-K", dest="gpu_K", type=int, default=512)
    ap.add_argument("--gpu-D", dest="gpu_D", type=int, default=1024)
    ap.add_argument("--no-cpu", action="store_true", help="GPU section only")
    ap.add_argument("--compiled", action="store_true", help="also time the fused path with torch.compile'd blocks")
    ap.add_argument("--worker", choices=[*VARIANTS, "compiled"], help=argparse.SUPPRESS)
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
