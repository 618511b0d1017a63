"""PAL anchor profiles (DESIGN.md, Align steps 1-3): a plain reference and a fused, memory-efficient version.

For tokens z [B, T, D] with a validity mask [B, T] and anchors A [K, D]:

    R[b, t, k]     = cos(z_bt, a_k)                     (both L2-normalised, x / max(||x||, EPS))
    alpha[b, t, k] = softmax over valid t of R[b, t, k] / tau_p
    p[b, k]        = sum_t alpha[b, t, k] R[b, t, k]

`anchor_profiles_reference` writes this down in plain PyTorch and materialises [B, T, K] several times over (and
autograd keeps several of those copies for the backward). `anchor_profiles` computes the same numbers by streaming
over blocks of tokens with an online softmax-weighted reduction, keeps only O(B*K) statistics for the backward and
recomputes R there. On CUDA tensors with Triton installed it runs a Triton kernel (`align/kernel_triton.py`);
everywhere else it runs the blocked PyTorch `torch.autograd.Function` below. See docs/kernel.md.

Dtypes: the computation runs in float32, or float64 when either input is float64; the result has that dtype.
Token gradients come back in the tokens' dtype, anchor gradients in the anchors' dtype. Rows with no valid token
give p = 0 and zero gradients (never NaN).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

EPS = 1e-6
"""Norm floor of the L2 normalisation (as `F.normalize(x, eps=EPS)`), shared by every implementation."""

TARGET_BLOCK_ELEMS = 1 << 20
"""Default block size aims at about this many elements per [B, block_t, K] temporary (4 MB in float32): small
enough to stay in cache, large enough that the per-block GEMM runs at full speed and Python overhead is noise.
Measured on the 2-core CPU (B=256, K=512, D=384, one thread): block_t 4-8 ran fastest, 16 about 3% and 32 about
7-18% slower; the working memory grows with block_t by about 4.5 float32 tensors of [B, block_t, K]."""

Backend = Literal["auto", "torch", "triton"]


def compute_dtype(tokens: Tensor, anchors: Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32: half-precision tokens are upcast, never computed in."""
    return torch.float64 if torch.float64 in (tokens.dtype, anchors.dtype) else torch.float32


def _check(tokens: Tensor, mask: Tensor, anchors: Tensor, tau_p: float) -> None:
    if tokens.dim() != 3 or anchors.dim() != 2 or mask.dim() != 2:
        raise ValueError(
            f"want tokens [B,T,D], mask [B,T], anchors [K,D]; got {tuple(tokens.shape)}, "
            f"{tuple(mask.shape)}, {tuple(anchors.shape)}"
        )
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    if anchors.shape[1] != tokens.shape[2]:
        raise ValueError(f"anchor dim {anchors.shape[1]} != token dim {tokens.shape[2]}")
    if not tau_p > 0:
        raise ValueError(f"tau_p must be > 0, got {tau_p}")


def anchor_profiles_reference(tokens: Tensor, mask: Tensor, anchors: Tensor, tau_p: float) -> Tensor:
    """Plain PyTorch profiles p [B, K]; the definition the fused versions are tested against."""
    _check(tokens, mask, anchors, tau_p)
    cd = compute_dtype(tokens, anchors)
    z = F.normalize(tokens.to(cd), dim=-1, eps=EPS)
    a = F.normalize(anchors.to(cd), dim=-1, eps=EPS)
    r = z @ a.T  # [B, T, K]
    valid = mask.bool()
    u = (r / tau_p).masked_fill(~valid[:, :, None], float("-inf"))
    row = valid.any(dim=1)  # rows with no valid token: a finite dummy softmax, zeroed below (no NaN, zero grad)
    u = u.masked_fill(~row[:, None, None], 0.0)
    p = (torch.softmax(u, dim=1) * r).sum(dim=1)
    return torch.where(row[:, None], p, torch.zeros_like(p))


def default_block_t(batch: int, n_anchors: int) -> int:
    """Tokens per block: about TARGET_BLOCK_ELEMS elements per [B, block_t, K] temporary, clamped to [4, 256]."""
    return int(min(256, max(4, TARGET_BLOCK_ELEMS // max(1, batch * n_anchors))))


def _last_valid(mask: Tensor) -> int:
    """One past the last token column valid in any row: padded tail blocks are skipped altogether."""
    cols = mask.any(dim=0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 0


def fixed_shift(tau_p: float, dtype: torch.dtype) -> bool:
    """Whether exp(R / tau - 1 / tau) stays a normal float for every R in [-1, 1]: then the softmax needs no running
    max (1 / tau is the largest possible logit, |R| <= 1), which saves two passes over every block and one in the
    backward. Smaller tau_p (below about 0.025 in float32, 0.003 in float64) takes the online-max path."""
    return 2.0 / tau_p <= FIXED_SHIFT_LIMIT[dtype]


FIXED_SHIFT_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}
"""Largest -log of a softmax term allowed on the fixed-shift path: exp(-80) = 1.8e-35 and exp(-700) = 1e-304 are
normal float32 / float64 numbers (no underflow, no slow denormals)."""


def _mask_bias(valid: Tensor, shift: float, dtype: torch.dtype) -> Tensor:
    """[B, n] additive bias of the logits: -shift at valid tokens, -inf at padding (exp(-inf) = 0: masked exactly)."""
    out = torch.full(valid.shape, -shift, dtype=dtype, device=valid.device)
    return out.masked_fill_(~valid, float("-inf"))


def _blocks(t_end: int, block_t: int) -> list[tuple[int, int]]:
    return [(t0, min(t0 + block_t, t_end)) for t0 in range(0, t_end, block_t)]


def _fwd_block_fixed(r: Tensor, bias: Tensor, lsum: Tensor, s: Tensor, inv_tau: float) -> None:
    """Accumulate sum_t e and sum_t e R in place, e = exp(R / tau - 1 / tau) (the shift sits in `bias`)."""
    e = torch.add(bias, r, alpha=inv_tau).exp_()
    lsum += e.sum(dim=1)
    s += e.mul_(r).sum(dim=1)


def _fwd_block(
    r: Tensor, bias: Tensor, m: Tensor, lsum: Tensor, s: Tensor, inv_tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Online update of (running max m, sum_t e, sum_t e R) with e = exp(R / tau - m) over one block of tokens."""
    u = torch.add(bias, r, alpha=inv_tau)  # R / tau, -inf at padding
    m_new = torch.maximum(m, u.amax(dim=1))
    scale = torch.exp(m - m_new)
    e = u.sub_(m_new[:, None]).exp_()
    lsum = lsum * scale + e.sum(dim=1)
    s = s * scale + e.mul_(r).sum(dim=1)
    return m_new, lsum, s


def _bwd_block(r: Tensor, bias: Tensor, lse: Tensor | None, c0: Tensor, c1: Tensor, inv_tau: float) -> Tensor:
    """dR = alpha (c0 + c1 R) with alpha = exp(R / tau + bias - lse) (0 at padding). On the fixed-shift path `lse` is
    None: bias holds -1 / tau and c0, c1 come divided by sum_t e, which turns exp(R / tau - 1 / tau) into alpha."""
    u = torch.add(bias, r, alpha=inv_tau)
    if lse is not None:
        u.sub_(lse[:, None])
    return torch.addcmul(c0[:, None], c1[:, None], r).mul_(u.exp_())


_COMPILED: dict[str, object] = {}


def _block_fns(compiled: bool):
    """The per-block elementwise steps, eager or through torch.compile (fuses them into one loop each)."""
    if not compiled:
        return _fwd_block_fixed, _fwd_block, _bwd_block
    if not _COMPILED:
        for name, fn in (("fixed", _fwd_block_fixed), ("fwd", _fwd_block), ("bwd", _bwd_block)):
            _COMPILED[name] = torch.compile(fn)
    return _COMPILED["fixed"], _COMPILED["fwd"], _COMPILED["bwd"]


class _BlockedProfiles(torch.autograd.Function):
    """Streams over token blocks; saves the inputs plus O(B*T + B*K) statistics, recomputes R in the backward."""

    @staticmethod
    def forward(
        ctx, tokens: Tensor, mask: Tensor, anchors: Tensor, tau_p: float, block_t: int, compiled: bool
    ) -> Tensor:
        cd = compute_dtype(tokens, anchors)
        bsz, n_tok, dim = tokens.shape
        n_anc = anchors.shape[0]
        valid = mask.bool()
        a = anchors.detach().to(cd)
        a_norm = torch.linalg.vector_norm(a, dim=-1)
        a_inv = 1.0 / a_norm.clamp_min(EPS)
        an = a * a_inv[:, None]
        an_t = an.T.contiguous()
        inv_tau = 1.0 / tau_p
        t_end = _last_valid(valid)
        fixed = fixed_shift(tau_p, cd)
        fwd_fixed, fwd_online, _ = _block_fns(compiled)
        bias = _mask_bias(valid[:, :t_end], inv_tau if fixed else 0.0, cd)[:, :, None]  # [B, t_end, 1]

        z_all = tokens.detach()
        tok_inv = torch.zeros(bsz, n_tok, dtype=cd, device=tokens.device)  # 1 / max(||z_bt||, EPS), in one pass
        tok_inv[:, :t_end] = torch.linalg.vector_norm(z_all[:, :t_end], dim=-1, dtype=cd).clamp_min_(EPS).reciprocal_()
        # Online path: the running max starts at a lower bound of every valid u = R / tau (|R| <= 1), so it is finite
        # from the start. Fixed path: the shift is 1 / tau throughout.
        m = torch.full((bsz, n_anc), inv_tau if fixed else -2.0 * inv_tau - 1.0, dtype=cd, device=tokens.device)
        lsum = torch.zeros(bsz, n_anc, dtype=cd, device=tokens.device)  # sum_t exp(u - m)
        s = torch.zeros(bsz, n_anc, dtype=cd, device=tokens.device)  # sum_t exp(u - m) R
        for t0, t1 in _blocks(t_end, block_t):
            zb = z_all[:, t0:t1] * tok_inv[:, t0:t1, None]  # in the compute dtype (type promotion), normalised
            r = (zb.reshape(-1, dim) @ an_t).view(bsz, t1 - t0, n_anc)
            if fixed:
                fwd_fixed(r, bias[:, t0:t1], lsum, s, inv_tau)
            else:
                m, lsum, s = fwd_online(r, bias[:, t0:t1], m, lsum, s, inv_tau)
            del zb, r  # free this block's temporaries before the next block allocates its own
        row = lsum > 0
        lsum_safe = torch.where(row, lsum, torch.ones_like(lsum))
        p = torch.where(row, s / lsum_safe, torch.zeros_like(s))
        # alpha = exp(u - lse); the fixed path keeps 1 / sum_t e instead (0 for empty rows) and folds it into c0, c1
        stat = (
            torch.where(row, 1.0 / lsum_safe, torch.zeros_like(s))
            if fixed
            else torch.where(row, m + torch.log(lsum_safe), torch.zeros_like(m))
        )
        ctx.save_for_backward(tokens, valid, tok_inv, an, a_inv, a_norm, stat, p)
        ctx.cfg = (tau_p, block_t, t_end, anchors.dtype, compiled, fixed)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_p: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None, None]:
        tokens, valid, tok_inv, an, a_inv, a_norm, stat, p = ctx.saved_tensors
        tau_p, block_t, t_end, anchor_dtype, compiled, fixed = ctx.cfg
        bwd_block = _block_fns(compiled)[2]
        want_z, _, want_a = ctx.needs_input_grad[:3]
        cd = an.dtype
        bsz, n_tok, dim = tokens.shape
        n_anc = an.shape[0]
        inv_tau = 1.0 / tau_p
        an_t = an.T.contiguous()
        g = grad_p.to(cd)
        c0 = g * (1.0 - p * inv_tau)
        c1 = g * inv_tau
        lse = None
        if fixed:
            c0, c1 = c0 * stat, c1 * stat
        else:
            lse = stat
        bias = _mask_bias(valid[:, :t_end], inv_tau if fixed else 0.0, cd)[:, :, None]
        dz = torch.zeros_like(tokens) if want_z else None  # columns past t_end are padding: zero gradient
        dan = torch.zeros_like(an) if want_a else None
        for t0, t1 in _blocks(t_end, block_t):
            ib = tok_inv[:, t0:t1]
            zb = tokens[:, t0:t1] * ib[:, :, None]
            r = (zb.reshape(-1, dim) @ an_t).view(bsz, t1 - t0, n_anc)
            dr = bwd_block(r, bias[:, t0:t1], lse, c0, c1, inv_tau).reshape(-1, n_anc)
            if dan is not None:
                dan.addmm_(dr.T, zb.reshape(-1, dim))
            if dz is not None:
                dzn = (dr @ an).view(bsz, t1 - t0, dim)
                # through z / max(||z||, EPS): (g - zn (zn . g)) / ||z||, or g / EPS where the floor is active
                dot = (zb * dzn).sum(dim=-1, keepdim=True) * (ib < 1.0 / EPS)[:, :, None]
                dz[:, t0:t1] = dzn.addcmul_(zb, dot, value=-1.0).mul_(ib[:, :, None])
                del dzn, dot
            del zb, r, dr  # free this block's temporaries before the next block allocates its own
        da = None
        if dan is not None:
            dot = (an * dan).sum(dim=-1, keepdim=True) * (a_norm > EPS)[:, None]
            da = ((dan - an * dot) * a_inv[:, None]).to(anchor_dtype)
        return dz, None, da, None, None, None


def triton_usable(tokens: Tensor, anchors: Tensor) -> bool:
    """The Triton path takes CUDA tensors of 16/32-bit floats when triton imports and the kernels pass their
    first-use self-test on this device and dtype (`triton_self_test`); float64 stays on torch."""
    if not (tokens.is_cuda and anchors.is_cuda):
        return False
    if torch.float64 in (tokens.dtype, anchors.dtype):
        return False
    from . import kernel_triton

    return kernel_triton.AVAILABLE and triton_self_test(tokens.device, tokens.dtype)


_SELF_TESTS: dict[tuple, bool] = {}


def triton_self_test(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Run the Triton kernels once per (device, dtype, tf32 setting) on a small input, forward and backward, against
    the float64 reference; True when they agree. A Triton error (a kernel that does not compile or does not fit this
    GPU's shared memory) or a mismatch gives a warning and False, and `anchor_profiles` then uses the blocked PyTorch
    path on that device: a GPU the kernels were never tuned on still trains, just slower. Any other error is a bug
    and propagates.
    """
    key = (str(device), dtype, torch.backends.cuda.matmul.allow_tf32)
    if key in _SELF_TESTS:
        return _SELF_TESTS[key]
    from . import kernel_triton

    g = torch.Generator().manual_seed(0)
    # sizes off the tiles (T 70, D 72, K 130): tails in every dimension; a half-masked and an empty row
    tokens = torch.randn(3, 70, 72, generator=g).to(device=device, dtype=dtype)
    anchors = torch.randn(130, 72, generator=g).to(device)
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, 35:] = False
    mask[2] = False
    mask = mask.to(device)
    why = ""
    with torch.enable_grad():
        z, a = tokens.clone().requires_grad_(), anchors.clone().requires_grad_()
        try:
            p = kernel_triton.anchor_profiles_triton(z, mask, a, 0.1)
            got = (p, *torch.autograd.grad(p.square().sum(), (z, a)))
        except Exception as e:  # noqa: BLE001 - only Triton's own errors are caught, see below
            if type(e).__module__.split(".")[0] != "triton":
                raise
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not why:
            z64, a64 = tokens.double().requires_grad_(), anchors.double().requires_grad_()
            p64 = anchor_profiles_reference(z64, mask, a64, 0.1)
            want = (p64, *torch.autograd.grad(p64.square().sum(), (z64, a64)))
            for name, x, y in zip(("profiles", "token gradient", "anchor gradient"), got, want):
                err = (x.double() - y).abs().max().item()
                if not err <= 2e-2 * max(1.0, y.abs().max().item()):  # catches wrong results, not rounding
                    why = f"{name} differ from the reference by {err:.3g}"
                    break
    ok = not why
    if not ok:
        import warnings

        warnings.warn(
            f"Triton profile kernel unusable for {dtype} on {device} ({why}); using the blocked PyTorch "
            "path there (correct, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
    _SELF_TESTS[key] = ok
    return ok


def anchor_profiles(
    tokens: Tensor,
    mask: Tensor,
    anchors: Tensor,
    tau_p: float,
    *,
    block_t: int | None = None,
    backend: Backend = "auto",
    compiled: bool | None = None,
) -> Tensor:
    """Fused profiles p [B, K], equal to `anchor_profiles_reference` without its [B, T, K] memory.

    backend "auto": Triton on CUDA tensors when `triton_usable`, else the blocked PyTorch function. "triton" forces
    the Triton kernel (CPU tensors work only under TRITON_INTERPRET=1, which is how the tests run it); "torch"
    forces the blocked function (any device). block_t: tokens per block of the torch path (default
    `default_block_t`); the Triton path has its own tile sizes. compiled: run the torch path's per-block
    elementwise steps through torch.compile (default: on when the environment sets PIPE_KERNEL_COMPILE=1). On the
    2-core CPU it measured about 20% faster per call but costs 10-20 s of compilation per new shape, dtype or
    tau_p, and needs a C++ compiler, hence opt-in (docs/kernel.md).
    """
    _check(tokens, mask, anchors, tau_p)
    if backend == "triton" or (backend == "auto" and triton_usable(tokens, anchors)):
        from . import kernel_triton

        return kernel_triton.anchor_profiles_triton(tokens, mask, anchors, float(tau_p))
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    bt = block_t or default_block_t(tokens.shape[0], anchors.shape[0])
    if bt < 1:
        raise ValueError(f"block_t must be >= 1, got {block_t}")
    if compiled is None:
        compiled = os.environ.get("PIPE_KERNEL_COMPILE", "0") not in ("", "0")
    return _BlockedProfiles.apply(tokens, mask, anchors, float(tau_p), int(bt), bool(compiled))
