"""The prepared GPU check of issue 14, one table: `pytest -m gpu`, the Triton kernel, extraction against a bare
forward loop, and a PAL epoch resident and streamed. Run it through `bash bench/gpu.sh` (see docs/gpu.md).

    python bench/gpu_check.py [--tiny] [--budget 420]

--tiny: the same code on CPU with tiny sizes (Triton under TRITON_INTERPRET=1, set by gpu.sh), so CI can test that
it runs; its speed rows carry no verdict. Nothing here needs a network: models are random weights built from
transformers configs of the real sizes, data are written into a temp folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gpu_epoch
import gpu_extract
import gpu_kernel
from gpu_table import Table, device_line

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(table: Table, tiny: bool, timeout: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-x"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else f"no output (rc {out.returncode})"
    if out.returncode not in (0, 5):  # 5: nothing collected
        print(out.stdout[-6000:], out.stderr[-3000:], file=sys.stderr)
    ok = out.returncode == 0 and "passed" in summary and "failed" not in summary and "error" not in summary
    table.set("pytest-gpu", f"{summary} ({time.perf_counter() - t0:.0f} s)", None if tiny else ok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (CI): checks that every row runs")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; a section that would start later is skipped")
    args = ap.parse_args()
    device, name, peak = device_line()
    if not args.tiny and device != "cuda":
        sys.exit("bench/gpu.sh: no CUDA device; use --tiny to check that the script runs on CPU")
    table = Table(args.tiny, args.budget)
    table.add("pytest-gpu", "pytest -m gpu", "all pass")
    for dt in ("fp32", "bf16", "fp16"):
        table.add(f"triton-err-{dt}", f"Triton vs float64 reference, {dt} tokens", "test_kernel tolerance")
    table.add("triton-vs-matmul", "Triton fwd+bwd TFLOP/s vs bf16 matmul (B4096 T257 K512 D1024)", ">= 50%")
    for m, what in (("image", "DINOv2-L/14"), ("text", "RoBERTa-large")):
        table.add(f"extract-{m}", f"pipe extract vs bare forward loop, {what}", ">= 0.85x")
        table.add(f"mfu-{m}", f"bare loop model FLOP/s vs bf16 peak, {what}", ">= 35%")
    table.add("epoch-resident", "PAL epoch, 82,783 pairs ViT-S, tokens on device", "<= 3x FLOP floor")
    table.add("epoch-streamed", "same epoch streamed from Zarr", "<= 1.15x resident")

    tmp = Path(tempfile.mkdtemp(prefix="pipe-gpu-check-"))
    results: dict = {}
    try:
        table.section(["pytest-gpu"], lambda: run_pytest(table, args.tiny, 180), "pytest -m gpu", 30)
        table.section(
            ["triton-err-fp32", "triton-err-bf16", "triton-err-fp16", "triton-vs-matmul"],
            lambda: gpu_kernel.run(table, device, args.tiny, results),
            "triton",
            40,
        )
        table.section(
            ["extract-image", "mfu-image", "extract-text", "mfu-text"],
            lambda: gpu_extract.run(table, device, args.tiny, tmp / "extract", peak),
            "extract",
            90,
        )
        shutil.rmtree(tmp / "extract", ignore_errors=True)
        table.section(
            ["epoch-resident", "epoch-streamed"],
            lambda: gpu_epoch.run(table, device, args.tiny, tmp / "epoch", results),
            "epoch",
            150,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch

    print()
    print(
        f"device: {name}; torch {torch.__version__}; assumed dense bf16 peak: "
        f"{f'{peak:.0f} TFLOP/s (table in bench/gpu_table.py)' if peak else 'unknown'}"
        f"{'; --tiny: CPU, tiny sizes, speed rows carry no verdict' if args.tiny else ''}"
    )
    table.print()


if __name__ == "__main__":
    main()
