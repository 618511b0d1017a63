"""Triton rows of the GPU check: max error against the float64 reference for float32 / bfloat16 / float16 tokens,
and TFLOP/s of one training step's profile work (forward + backward to the anchors) against the measured bf16
matmul rate of the same GEMM shape (tokens [B*T, D] x anchors [D, K]) in cuBLAS.

FLOPs counted: 3 GEMMs of B*T*K*D (forward, the backward's recomputation, the anchor gradient), 2 FLOPs per
multiply-add; the backward's token gradient is not asked for (frozen tokens), as in training.
"""

from __future__ import annotations

import torch
from gpu_table import Table, timed

from pipe_align.align import kernel_triton
from pipe_align.align.kernel import anchor_profiles, anchor_profiles_reference

TAU_P = 0.03


def inputs(b: int, t: int, k: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randn(b, t, d, device=device, generator=gen).to(dtype)
    mask = torch.rand(b, t, device=device, generator=gen) > 0.05
    mask[:, 0] = True
    anchors = torch.randn(k, d, device=device, generator=gen).requires_grad_(True)
    return tokens, mask, anchors


def max_errors(b: int, t: int, k: int, d: int, device: str) -> dict[str, tuple[float, float]]:
    """Per token dtype: (max |p - p_ref|, max |dA - dA_ref| / max |dA_ref|), reference in float64 on the same tokens."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        tokens, mask, anchors = inputs(b, t, k, d, dtype, device)
        p = anchor_profiles(tokens, mask, anchors, TAU_P, backend="triton")
        (ga,) = torch.autograd.grad(p.sum(), anchors)
        a64 = anchors.detach().double().requires_grad_(True)
        p_ref = anchor_profiles_reference(tokens.double(), mask, a64, TAU_P)
        (ga_ref,) = torch.autograd.grad(p_ref.sum(), a64)
        out[name] = (
            float((p.detach().double() - p_ref.detach()).abs().max()),
            float((ga.double() - ga_ref).abs().max() / ga_ref.abs().max()),
        )
    return out


def step_seconds(b: int, t: int, k: int, d: int, device: str, reps: int) -> tuple[float, float]:
    """(forward s, forward + backward-to-anchors s) of the Triton kernel on bf16 tokens (autotuned on first call)."""
    tokens, mask, anchors = inputs(b, t, k, d, torch.bfloat16, device)

    def fwd():
        with torch.no_grad():
            anchor_profiles(tokens, mask, anchors, TAU_P, backend="triton")

    def step():
        p = anchor_profiles(tokens, mask, anchors, TAU_P, backend="triton")
        torch.autograd.grad(p.sum(), anchors)

    return timed(fwd, device, reps, warmup=2), timed(step, device, reps, warmup=2)


def matmul_tflops(m: int, k: int, n: int, device: str, reps: int) -> float:
    """Measured bf16 GEMM rate [m, k] x [k, n] (cuBLAS on CUDA, float32 accumulate)."""
    a = torch.randn(m, k, device=device).to(torch.bfloat16)
    w = torch.randn(k, n, device=device).to(torch.bfloat16)
    seconds = timed(lambda: a @ w, device, reps, warmup=2)
    return 2.0 * m * k * n / seconds / 1e12


def run(table: Table, device: str, tiny: bool, results: dict) -> None:
    if device != "cuda" and not kernel_triton.interpreting():
        for key in ("triton-err-fp32", "triton-err-bf16", "triton-err-fp16", "triton-vs-matmul"):
            table.set(key, "skipped: no CUDA (and not under TRITON_INTERPRET=1)", None)
        return
    b, t, k, d = (4, 33, 40, 24) if tiny else (4096, 257, 512, 1024)
    tol = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}  # profile error bars of tests/test_kernel.py, fp32 relaxed for D
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 tokens: exact dots, so the error row means float32
    try:
        errors = max_errors(min(b, 256), t, k, d, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for name, (ep, eg) in errors.items():
        table.set(f"triton-err-{name}", f"p {ep:.2e}, dA {eg:.2e} (rel)", ep <= tol[name] and eg <= tol[name])
    reps = 2 if tiny else 10
    fwd_s, step_s = step_seconds(b, t, k, d, device, reps)
    tf_fwd = 2.0 * b * t * k * d / fwd_s / 1e12
    tf_step = 6.0 * b * t * k * d / step_s / 1e12
    mm = matmul_tflops(b * t, d, k, device, reps)
    results["matmul_tflops"] = mm
    table.set(
        "triton-vs-matmul",
        f"{tf_step:.1f} TFLOP/s fwd+bwd ({tf_fwd:.1f} fwd) vs matmul {mm:.1f} = {tf_step / mm:.0%}",
        tf_step >= 0.5 * mm,
    )
    if device == "cuda" and kernel_triton.PINNED is None:
        best = {str(key): str(cfg) for key, cfg in kernel_triton._profiles_fwd.cache.items()}
        table.notes.append(f"triton forward tiles picked by autotune: {best}")
