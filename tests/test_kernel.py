"""PAL anchor-profile kernels (align/kernel.py): fused == reference == the definition, values and gradients."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipe_align.align import kernel
from pipe_align.align.kernel import anchor_profiles, anchor_profiles_reference

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def make_inputs(
    b: int = 5,
    t: int = 23,
    d: int = 12,
    k: int = 9,
    *,
    dtype=torch.float64,
    anchor_dtype=torch.float64,
    seed: int = 0,
    device: str = "cpu",
):
    """Random tokens/anchors and a mask with a full row, a row with 1 valid token, an empty row and ragged rows."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    anchors = torch.randn(k, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) > 0.35
    mask[0] = True
    mask[1] = False
    mask[1, t // 2] = True  # nearly empty: one valid token
    mask[2] = False  # fully empty
    if b > 3:
        mask[3, t - 3 :] = False  # padded tail
    tokens[~mask] *= 7.0  # padding holds junk: it must not matter
    tokens, anchors = tokens.to(device=device, dtype=dtype), anchors.to(device=device, dtype=anchor_dtype)
    return tokens.requires_grad_(), mask.to(device), anchors.requires_grad_()


def values_and_grads(fn, tokens, mask, anchors, tau, upstream=None, **kw):
    p = fn(tokens, mask, anchors, tau, **kw)
    if upstream is None:
        upstream = torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gz, ga = torch.autograd.grad(p, (tokens, anchors), upstream.to(device=p.device, dtype=p.dtype))
    return p, gz, ga


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return torch.allclose(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol)


def definition(tokens, mask, anchors, tau):
    """The formula written out with Python loops (float64), to check the reference itself."""
    z = tokens.detach().double()
    a = anchors.detach().double()
    out = torch.zeros(z.shape[0], a.shape[0], dtype=torch.float64)
    for b in range(z.shape[0]):
        ts = [t for t in range(z.shape[1]) if mask[b, t]]
        for k in range(a.shape[0]):
            r = [float(z[b, t] @ a[k] / (z[b, t].norm().clamp_min(1e-6) * a[k].norm().clamp_min(1e-6))) for t in ts]
            if not r:
                continue
            w = [math.exp((x - max(r)) / tau) for x in r]
            out[b, k] = sum(wi * x for wi, x in zip(w, r, strict=True)) / sum(w)
    return out


@pytest.mark.parametrize("tau", [0.03, 1.0])
def test_reference_matches_definition(tau):
    tokens, mask, anchors = make_inputs(b=4, t=6, d=5, k=3)
    got = anchor_profiles_reference(tokens, mask, anchors, tau)
    assert torch.allclose(got, definition(tokens, mask, anchors, tau), atol=1e-12)


@pytest.mark.parametrize("tau", [0.03, 1.0, 0.005, 0.002])  # 0.002: below the fixed-shift limit
@pytest.mark.parametrize("block_t", [1, 4, 7, 64])
def test_fused_matches_reference_float64(tau, block_t):
    tokens, mask, anchors = make_inputs()  # T = 23: not a multiple of 4 or 7, smaller than 64
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, tau)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, tau, block_t=block_t, backend="torch")
    assert p.dtype == torch.float64 and gz.dtype == tokens.dtype and ga.dtype == anchors.dtype
    assert close(p, p_ref, 1e-10, 1e-12)
    assert close(gz, gz_ref, 1e-9, 1e-10)
    assert close(ga, ga_ref, 1e-9, 1e-10)
    assert gz_ref.abs().max() > 1e-3 and ga_ref.abs().max() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("tau", [0.03, 0.01])  # float32: 0.03 (PAL default) takes the fixed shift, 0.01 the online max
def test_float32_paths_match_reference(tau):
    assert kernel.fixed_shift(tau, torch.float32) == (tau == 0.03)
    tokens, mask, anchors = make_inputs(b=6, t=40, d=32, k=16, dtype=torch.float32, anchor_dtype=torch.float32)
    t64, a64 = (x.detach().double().requires_grad_() for x in (tokens, anchors))
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, t64, mask, a64, tau)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, tau, block_t=8)
    assert close(p, p_ref, 1e-5, 1e-6)
    assert close(gz, gz_ref, 1e-4, 1e-5 * gz_ref.abs().max().item())
    assert close(ga, ga_ref, 1e-4, 1e-5 * ga_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_shift_at_its_limit_does_not_underflow(dtype):
    """The smallest tau on the fixed-shift path, and a row whose every cosine is -1: its softmax terms are all
    exp(-2 / tau), the smallest the path allows; they must stay nonzero (else the row would count as empty)."""
    tau = 2.0 / kernel.FIXED_SHIFT_LIMIT[dtype]
    assert kernel.fixed_shift(tau, dtype) and not kernel.fixed_shift(tau * 0.99, dtype)
    tokens, mask, anchors = make_inputs(dtype=dtype, anchor_dtype=dtype)
    with torch.no_grad():
        tokens[0] = -anchors[0]  # row 0 (all valid): cos(z_t, a_0) = -1 for every token
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, tau)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, tau, block_t=4)
    assert abs(p[0, 0].item() + 1.0) < 1e-5
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert close(p, p_ref, tol, tol) and close(ga, ga_ref, tol, tol * ga_ref.abs().max().item())
    assert torch.isfinite(gz).all()


def test_default_block_is_used_and_long_sequences():
    tokens, mask, anchors = make_inputs(b=3, t=300, d=8, k=5, seed=3)
    assert kernel.default_block_t(3, 5) < 300  # several blocks
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, 0.03)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, 0.03)
    assert close(p, p_ref, 1e-10, 1e-12) and close(gz, gz_ref, 1e-9, 1e-10) and close(ga, ga_ref, 1e-9, 1e-10)


@pytest.mark.parametrize("fn", [anchor_profiles_reference, anchor_profiles])
def test_empty_rows_are_zero_with_zero_gradient(fn):
    tokens, mask, anchors = make_inputs()
    p, gz, ga = values_and_grads(fn, tokens, mask, anchors, 0.03)
    assert torch.isfinite(p).all() and torch.isfinite(gz).all() and torch.isfinite(ga).all()
    assert (p[2] == 0).all() and (gz[2] == 0).all()
    assert (gz[~mask] == 0).all()  # padding gets no gradient
    assert (p[1] != 0).all()  # one valid token: p = its cosines
    assert torch.allclose(
        p[1], torch.nn.functional.cosine_similarity(tokens[1, mask[1]].detach(), anchors.detach(), dim=-1), atol=1e-12
    )


@pytest.mark.parametrize("fn", [anchor_profiles_reference, anchor_profiles])
def test_all_rows_empty(fn):
    tokens, _, anchors = make_inputs()
    mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    p, gz, ga = values_and_grads(fn, tokens, mask, anchors, 0.03)
    assert (p == 0).all() and (gz == 0).all() and (ga == 0).all()


def test_padding_content_does_not_matter():
    tokens, mask, anchors = make_inputs()
    other = tokens.detach().clone()
    other[~mask] = torch.randn(int((~mask).sum()), tokens.shape[-1], dtype=tokens.dtype) * 100
    assert torch.equal(anchor_profiles(tokens, mask, anchors, 0.03), anchor_profiles(other, mask, anchors, 0.03))


def test_norm_floor_branch_matches_reference():
    tokens, mask, anchors = make_inputs()
    with torch.no_grad():
        tokens[0, 3] *= 1e-9  # a valid token below EPS: the normalisation floor is active
        anchors[2] *= 1e-9
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, 0.3)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, 0.3, block_t=5)
    assert close(p, p_ref, 1e-10, 1e-12) and close(gz, gz_ref, 1e-9, 1e-9) and close(ga, ga_ref, 1e-9, 1e-9)


def test_non_contiguous_tokens():
    tokens, mask, anchors = make_inputs()
    tokens_tbd = tokens.detach().transpose(0, 1).contiguous().requires_grad_()  # stored [T, B, D]
    view = tokens_tbd.transpose(0, 1)
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, 0.03)
    p, gz, ga = values_and_grads(anchor_profiles, view, mask, anchors, 0.03, block_t=32)
    assert close(p, p_ref, 1e-10, 1e-12) and close(gz, gz_ref, 1e-9, 1e-10)
    assert close(ga, ga_ref, 1e-9, 1e-10)


def test_frozen_tokens_anchor_gradient_only():
    tokens, mask, anchors = make_inputs()
    tokens = tokens.detach()
    up = torch.randn(tokens.shape[0], anchors.shape[0], dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(anchor_profiles_reference(tokens, mask, anchors, 0.03), anchors, up)
    (g,) = torch.autograd.grad(anchor_profiles(tokens, mask, anchors, 0.03, block_t=6), anchors, up)
    assert close(g, g_ref, 1e-9, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tokens(dtype):
    tokens, mask, anchors = make_inputs(b=6, t=40, d=32, k=16, dtype=dtype, anchor_dtype=torch.float32)
    # the reference on the same (rounded) token values, in float64
    t64 = tokens.detach().double().requires_grad_()
    a64 = anchors.detach().double().requires_grad_()
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, t64, mask, a64, 0.03)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, 0.03, block_t=8)
    assert p.dtype == torch.float32 and gz.dtype == dtype and ga.dtype == torch.float32
    assert close(p, p_ref, 1e-4, 1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # the token gradient is rounded to the tokens' dtype
    assert close(gz, gz_ref, tol, tol * gz_ref.abs().max().item())
    assert close(ga, ga_ref, 1e-4, 1e-5 * ga_ref.abs().max().item())


def test_gradcheck_fused():
    tokens, mask, anchors = make_inputs(b=3, t=5, d=4, k=3, seed=2)
    fn = lambda z, a: anchor_profiles(z, mask, a, 0.2, block_t=2, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tokens, anchors), eps=1e-6, atol=1e-7)


def _wrong_bwd_block(r, bias, lse, c0, c1, inv_tau):
    """dR = g alpha (1 - (R - p) / tau), the sign of the softmax term flipped: what the tests must catch."""
    u = torch.add(bias, r, alpha=inv_tau)
    alpha = (u if lse is None else u - lse[:, None]).exp()  # fixed-shift path: lse None, c0 and c1 pre-scaled
    g = c1 / inv_tau  # c0 = g (1 - p / tau), c1 = g / tau
    return (2 * g - c0)[:, None].sub(c1[:, None] * r).mul(alpha)


@pytest.mark.parametrize("tau", [1.0, 0.002])  # the fixed-shift and the online-max path
def test_a_wrong_sign_is_caught(monkeypatch, tau):
    tokens, mask, anchors = make_inputs()
    assert kernel.fixed_shift(tau, torch.float64) == (tau == 1.0)
    _, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, tau)
    monkeypatch.setattr(kernel, "_bwd_block", _wrong_bwd_block)
    _, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, tau, block_t=4)
    assert not close(gz, gz_ref, 1e-6, 1e-8) and not close(ga, ga_ref, 1e-6, 1e-8)


def test_input_checks():
    tokens, mask, anchors = make_inputs()
    with pytest.raises(ValueError):
        anchor_profiles(tokens, mask[:, :-1], anchors, 0.03)
    with pytest.raises(ValueError):
        anchor_profiles(tokens, mask, anchors[:, :-1], 0.03)
    with pytest.raises(ValueError):
        anchor_profiles(tokens, mask, anchors, 0.0)
    with pytest.raises(ValueError):
        anchor_profiles(tokens, mask, anchors, 0.03, backend="cuda")


def test_cpu_dispatch_uses_torch_path():
    tokens, mask, anchors = make_inputs(dtype=torch.float32, anchor_dtype=torch.float32)
    assert not kernel.triton_usable(tokens, anchors)
    p = anchor_profiles(tokens, mask, anchors, 0.03)
    assert type(p.grad_fn).__name__.startswith("_BlockedProfiles")


@pytest.mark.skipif(not _has_triton() or INTERPRET, reason="needs triton; outside TRITON_INTERPRET")
def test_triton_refuses_cpu_tensors_without_interpreter():
    tokens, mask, anchors = make_inputs(dtype=torch.float32, anchor_dtype=torch.float32)
    with pytest.raises(RuntimeError):
        anchor_profiles(tokens, mask, anchors, 0.03, backend="triton")


@pytest.mark.slow
def test_compiled_blocks_match_reference():
    tokens, mask, anchors = make_inputs(dtype=torch.float32, anchor_dtype=torch.float32)
    p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, tokens, mask, anchors, 0.03)
    p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, 0.03, block_t=8, compiled=True)
    assert close(p, p_ref, 1e-5, 1e-6) and close(gz, gz_ref, 1e-4, 1e-5) and close(ga, ga_ref, 1e-4, 1e-5)


# --- Triton: run in the interpreter on CPU (a subprocess with TRITON_INTERPRET=1), and on CUDA when there is one.

TRITON_CASES = [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)]


def _check_triton(dtype, tol, device):
    # D, K, T not multiples of the tiles (64, 128, 64); padded tail, an empty and a one-token row
    tokens, mask, anchors = make_inputs(b=4, t=70, d=40, k=150, dtype=dtype, anchor_dtype=torch.float32, device=device)
    t64 = tokens.detach().double().requires_grad_()
    a64 = anchors.detach().double().requires_grad_()
    for tau in (0.03, 1.0):
        p_ref, gz_ref, ga_ref = values_and_grads(anchor_profiles_reference, t64, mask, a64, tau)
        p, gz, ga = values_and_grads(anchor_profiles, tokens, mask, anchors, tau, backend="triton")
        assert p.dtype == torch.float32 and gz.dtype == dtype and ga.dtype == torch.float32
        assert close(p, p_ref, tol, tol), (p - p_ref.to(p)).abs().max()
        assert close(gz, gz_ref, tol, tol * gz_ref.abs().max().item()), (gz - gz_ref.to(gz)).abs().max()
        assert close(ga, ga_ref, tol, tol * ga_ref.abs().max().item()), (ga - ga_ref.to(ga)).abs().max()
        assert (p[2] == 0).all() and (gz[2] == 0).all() and (gz[~mask] == 0).all()
    (g,) = torch.autograd.grad(anchor_profiles(tokens.detach(), mask, anchors, 0.03, backend="triton").sum(), anchors)
    (g_ref,) = torch.autograd.grad(anchor_profiles_reference(tokens.detach(), mask, a64, 0.03).sum(), a64)
    assert close(g, g_ref, tol, tol * g_ref.abs().max().item())


@pytest.mark.skipif(not (INTERPRET and _has_triton()), reason="runs under TRITON_INTERPRET=1 (see the next test)")
@pytest.mark.parametrize("dtype,tol", TRITON_CASES)
def test_triton_interp_matches_reference(dtype, tol, monkeypatch):
    from pipe_align.align import kernel_triton

    monkeypatch.setattr(kernel_triton, "BWD_CHUNK_ELEMS", 2 * 70 * 150)  # 2 rows per backward chunk: 2 chunks
    _check_triton(dtype, tol, "cpu")
    monkeypatch.setattr(kernel, "_SELF_TESTS", {})
    assert kernel.triton_self_test("cpu", dtype)  # the first-use check passes on kernels that are right


class _FakeTritonError(Exception):
    pass


_FakeTritonError.__module__ = "triton.runtime.errors"  # what Triton's OutOfResources / CompilationError look like


@pytest.mark.parametrize("failure", ["triton-error", "wrong-values"])
def test_triton_self_test_falls_back_and_warns(monkeypatch, failure):
    from pipe_align.align import kernel_triton

    def broken(tokens, mask, anchors, tau_p):
        if failure == "triton-error":
            raise _FakeTritonError("out of resource: shared memory, Required: 147456, Hardware limit: 101376")
        return anchor_profiles_reference(tokens, mask, anchors, tau_p) + 0.5 * (anchors.sum() * 0 + 1)

    calls = []
    monkeypatch.setattr(kernel, "_SELF_TESTS", {})
    monkeypatch.setattr(kernel_triton, "anchor_profiles_triton", lambda *a: calls.append(1) or broken(*a))
    with pytest.warns(RuntimeWarning, match="blocked PyTorch path"):
        assert kernel.triton_self_test("cpu", torch.float16) is False
    assert kernel.triton_self_test("cpu", torch.float16) is False and len(calls) == 1  # once per device and dtype


def test_triton_self_test_passes_other_errors_through(monkeypatch):
    from pipe_align.align import kernel_triton

    def bug(*args):
        raise IndexError("a bug in the wrapper, not a GPU limit")

    monkeypatch.setattr(kernel, "_SELF_TESTS", {})
    monkeypatch.setattr(kernel_triton, "anchor_profiles_triton", bug)
    with pytest.raises(IndexError):
        kernel.triton_self_test("cpu", torch.float32)


def test_triton_self_test_accepts_a_correct_kernel(monkeypatch):
    from pipe_align.align import kernel_triton

    monkeypatch.setattr(kernel, "_SELF_TESTS", {})
    monkeypatch.setattr(
        kernel_triton, "anchor_profiles_triton", lambda t, m, a, tau: anchor_profiles(t, m, a, tau, backend="torch")
    )
    assert kernel.triton_self_test("cpu", torch.bfloat16)


@pytest.mark.skipif(INTERPRET or not _has_triton(), reason="needs triton; already inside the interpreter run")
def test_triton_via_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(Path(__file__)),
        "-k",
        "triton_interp_matches",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"{len(TRITON_CASES)} passed" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _has_triton(), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype,tol", TRITON_CASES)
def test_triton_cuda_matches_reference(dtype, tol, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32: exact dots, not tf32
    tokens, _, anchors = make_inputs(dtype=dtype, anchor_dtype=torch.float32, device="cuda")
    assert kernel.triton_usable(tokens, anchors)
    _check_triton(dtype, tol, "cuda")
