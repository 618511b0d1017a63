"""Triton path of `pipe_align.align.kernel.anchor_profiles` (CUDA; CPU tensors only under TRITON_INTERPRET=1).

Forward: one program per (row b, tile of BLOCK_K anchors) walks the tokens in BLOCK_T tiles; each tile is a
token-anchor GEMM over D in BLOCK_D slices (the tokens' squared norms are summed in the same loop, so tokens are
normalised without a separate pass), then the online softmax-weighted reduction updates the running max m,
normaliser l and weighted sum s of that anchor tile in registers. Only p and lse = m + log l ([B, K]) and the
token inverse norms ([B, T]) are written.

Backward: D is too large (384-1536) to keep a row of the gradient in registers the way FlashAttention does for a
head dim of 64-128, so the two reductions of the backward (over K for the tokens, over B*T for the anchors) go to
cuBLAS. A Triton kernel recomputes R tile by tile and writes dR' = dp/dR * 1/||z|| for a chunk of rows only
(chunks sized by BWD_CHUNK_ELEMS, so memory stays bounded whatever B is); two GEMMs per chunk then give
dAn += dR'^T z and g = dR' An, and dz = g - z (z . g) / ||z||^2 (through the normalisation) in float32.

Tiles: both kernels are autotuned over `TILES` on CUDA (docs/gpu.md); the interpreter runs one fixed tile.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # import-guarded: the package must import and test without triton
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    AVAILABLE = False

EPS = 1e-6  # same floor as align.kernel.EPS (kept literal here to avoid an import cycle)
BWD_CHUNK_ELEMS = 1 << 27
"""Backward rows per chunk: about this many elements in the [chunk, T, max(K, D)] temporaries."""
TILES = [  # (BLOCK_T, BLOCK_K, BLOCK_D, num_warps, num_stages); the first is the one used without autotuning
    (64, 128, 64, 8, 3),
    (128, 128, 32, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 64, 64, 4, 4),
]
"""Autotuned per (K, D, token tile bucket, dtypes) on CUDA; tiles that do not fit a GPU's shared memory are dropped
by the autotuner (OutOfResources). Under TRITON_INTERPRET=1 (CPU tests) there is nothing to time: the tile
`PINNED` (default the first) runs, and PIPE_TRITON_TILE=i pins tile i on CUDA too (to compare against autotune)."""
PINNED: int | None = int(os.environ["PIPE_TRITON_TILE"]) if os.environ.get("PIPE_TRITON_TILE", "").isdigit() else None


if AVAILABLE:

    def _configs() -> list:
        return [
            triton.Config({"BLOCK_T": t, "BLOCK_K": k, "BLOCK_D": d}, num_warps=w, num_stages=st)
            for t, k, d, w, st in TILES
        ]

    @triton.autotune(configs=_configs(), key=["n_anc", "dim", "t_bucket"])
    @triton.jit
    def _profiles_fwd(
        z_ptr,
        a_ptr,
        valid_ptr,
        inv_ptr,
        p_ptr,
        lse_ptr,
        t_end,
        n_anc,
        dim,
        t_bucket,
        s_zb,
        s_zt,
        s_zd,
        s_vb,
        s_vt,
        inv_tau,
        m_init,
        eps,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # row offsets b * s_zb can pass 2^31 elements
        kb = tl.program_id(1)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_in = offs_k < n_anc
        m = tl.zeros([BLOCK_K], tl.float32) + m_init
        lsum = tl.zeros([BLOCK_K], tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        for t0 in range(0, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_in = offs_t < t_end
            acc = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
            ss = tl.zeros([BLOCK_T], tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_in = offs_d < dim
                zt = tl.load(
                    z_ptr + b * s_zb + offs_t[:, None] * s_zt + offs_d[None, :] * s_zd,
                    mask=t_in[:, None] & d_in[None, :],
                    other=0.0,
                )
                at = tl.load(
                    a_ptr + offs_k[None, :] * dim + offs_d[:, None], mask=d_in[:, None] & k_in[None, :], other=0.0
                )
                if UPCAST:
                    acc = tl.dot(zt.to(tl.float32), at.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(zt, at, acc, input_precision=PRECISION)
                zf = zt.to(tl.float32)
                ss += tl.sum(zf * zf, axis=1)
            inv = 1.0 / tl.maximum(tl.sqrt(ss), eps)
            if kb == 0:
                tl.store(inv_ptr + b * t_end + offs_t, inv, mask=t_in)
            ok = tl.load(valid_ptr + b * s_vb + offs_t * s_vt, mask=t_in, other=0) != 0
            r = acc * inv[:, None]
            u = tl.where(ok[:, None], r * inv_tau, float("-inf"))
            m_new = tl.maximum(m, tl.max(u, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.exp(u - m_new[None, :])
            lsum = lsum * scale + tl.sum(e, axis=0)
            s = s * scale + tl.sum(e * r, axis=0)
            m = m_new
        row = lsum > 0
        lsum_safe = tl.where(row, lsum, 1.0)
        tl.store(p_ptr + b * n_anc + offs_k, tl.where(row, s / lsum_safe, 0.0), mask=k_in)
        tl.store(lse_ptr + b * n_anc + offs_k, tl.where(row, m + tl.log(lsum_safe), 0.0), mask=k_in)

    @triton.autotune(configs=_configs(), key=["n_anc", "dim", "t_bucket"])
    @triton.jit
    def _profiles_bwd_dr(
        z_ptr,
        a_ptr,
        valid_ptr,
        inv_ptr,
        lse_ptr,
        p_ptr,
        g_ptr,
        dr_ptr,
        b0,
        t_end,
        n_anc,
        dim,
        t_bucket,
        s_zb,
        s_zt,
        s_zd,
        s_vb,
        s_vt,
        s_gb,
        s_gk,
        inv_tau,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        bl = tl.program_id(0).to(tl.int64)
        b = b0 + bl
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        t_in = offs_t < t_end
        k_in = offs_k < n_anc
        acc = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_in = offs_d < dim
            zt = tl.load(
                z_ptr + b * s_zb + offs_t[:, None] * s_zt + offs_d[None, :] * s_zd,
                mask=t_in[:, None] & d_in[None, :],
                other=0.0,
            )
            at = tl.load(a_ptr + offs_k[None, :] * dim + offs_d[:, None], mask=d_in[:, None] & k_in[None, :], other=0.0)
            if UPCAST:
                acc = tl.dot(zt.to(tl.float32), at.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(zt, at, acc, input_precision=PRECISION)
        inv = tl.load(inv_ptr + b * t_end + offs_t, mask=t_in, other=0.0)
        ok = tl.load(valid_ptr + b * s_vb + offs_t * s_vt, mask=t_in, other=0) != 0
        lse = tl.load(lse_ptr + b * n_anc + offs_k, mask=k_in, other=0.0)
        p = tl.load(p_ptr + b * n_anc + offs_k, mask=k_in, other=0.0)
        g = tl.load(g_ptr + b * s_gb + offs_k * s_gk, mask=k_in, other=0.0).to(tl.float32)
        r = acc * inv[:, None]
        alpha = tl.exp(tl.where(ok[:, None], r * inv_tau - lse[None, :], float("-inf")))
        # dp/dR = alpha (1 + (R - p) / tau); times upstream g; times 1/||z|| so the GEMMs can take raw tokens
        dr = g[None, :] * alpha * (1.0 + (r - p[None, :]) * inv_tau) * inv[:, None]
        tl.store(
            dr_ptr + bl * t_end * n_anc + offs_t[:, None] * n_anc + offs_k[None, :],
            dr.to(dr_ptr.dtype.element_ty),
            mask=t_in[:, None] & k_in[None, :],
        )


def _precision(dtype: torch.dtype) -> str:
    """float32 follows torch's own matmul setting (tf32 when allowed); 16-bit dots are exact products anyway."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run in numpy on CPU tensors)."""
    if not AVAILABLE:
        return False
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _upcast(dtype: torch.dtype) -> bool:
    """The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584): upcast there only."""
    return dtype == torch.bfloat16 and interpreting()


def _launcher(kernel):
    """The autotuned kernel on CUDA; the jitted function with one fixed tile when interpreting or pinned."""
    if PINNED is None and not interpreting():
        return kernel, {}
    t, k, d, w, st = TILES[PINNED or 0]
    return kernel.fn, {"BLOCK_T": t, "BLOCK_K": k, "BLOCK_D": d, "num_warps": w, "num_stages": st}


def _t_bucket(t_end: int) -> int:
    """Autotune key for the token count: its power-of-two ceiling (text lengths vary per batch; 257 and 32 differ)."""
    return max(16, 1 << max(0, t_end - 1).bit_length())


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with a float32 result; on CUDA 16-bit inputs keep a float32 output (no rounding of the partial sum)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return (a @ b).float()


def _last_valid(mask: Tensor) -> int:
    cols = mask.any(dim=0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 0


class _TritonProfiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: Tensor, mask: Tensor, anchors: Tensor, tau_p: float) -> Tensor:
        bsz, _, dim = tokens.shape
        n_anc = anchors.shape[0]
        dev = tokens.device
        z = tokens.detach()
        valid = mask.bool()
        t_end = _last_valid(valid)
        a = anchors.detach().float()
        a_norm = torch.linalg.vector_norm(a, dim=-1)
        a_inv = 1.0 / a_norm.clamp_min(EPS)
        an = a * a_inv[:, None]
        an_op = an.to(z.dtype).contiguous()  # the dot's operand: same dtype as the tokens
        valid_u8 = valid.view(torch.uint8)
        tok_inv = torch.zeros(bsz, t_end, dtype=torch.float32, device=dev)
        p = torch.empty(bsz, n_anc, dtype=torch.float32, device=dev)
        lse = torch.empty(bsz, n_anc, dtype=torch.float32, device=dev)
        inv_tau = 1.0 / tau_p
        kernel, fixed = _launcher(_profiles_fwd)
        grid = lambda meta: (bsz, triton.cdiv(n_anc, meta["BLOCK_K"]))  # noqa: E731
        kernel[grid](
            z,
            an_op,
            valid_u8,
            tok_inv,
            p,
            lse,
            t_end,
            n_anc,
            dim,
            _t_bucket(t_end),
            z.stride(0),
            z.stride(1),
            z.stride(2),
            valid_u8.stride(0),
            valid_u8.stride(1),
            inv_tau,
            -2.0 * inv_tau - 1.0,
            EPS,
            PRECISION=_precision(z.dtype),
            UPCAST=_upcast(z.dtype),
            **fixed,
        )
        ctx.save_for_backward(tokens, valid_u8, tok_inv, an, an_op, a_inv, a_norm, lse, p)
        ctx.cfg = (tau_p, t_end, anchors.dtype)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_p: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        tokens, valid_u8, tok_inv, an, an_op, a_inv, a_norm, lse, p = ctx.saved_tensors
        tau_p, t_end, anchor_dtype = ctx.cfg
        want_z, _, want_a = ctx.needs_input_grad[:3]
        bsz, _, dim = tokens.shape
        n_anc = an.shape[0]
        z = tokens.detach()
        g = grad_p.float()
        dz = torch.zeros_like(tokens) if want_z else None
        dan = torch.zeros_like(an) if want_a else None
        if t_end > 0 and (want_z or want_a):
            chunk = max(1, min(bsz, BWD_CHUNK_ELEMS // (t_end * max(n_anc, dim))))
            dr_dtype = z.dtype if z.dtype in (torch.float16, torch.bfloat16) else torch.float32
            dr = torch.empty(chunk, t_end, n_anc, dtype=dr_dtype, device=z.device)
            kernel, fixed = _launcher(_profiles_bwd_dr)
            for b0 in range(0, bsz, chunk):
                nb = min(chunk, bsz - b0)

                def grid(meta, nb=nb):
                    return nb, triton.cdiv(t_end, meta["BLOCK_T"]), triton.cdiv(n_anc, meta["BLOCK_K"])

                kernel[grid](
                    z,
                    an_op,
                    valid_u8,
                    tok_inv,
                    lse,
                    p,
                    g,
                    dr,
                    b0,
                    t_end,
                    n_anc,
                    dim,
                    _t_bucket(t_end),
                    z.stride(0),
                    z.stride(1),
                    z.stride(2),
                    valid_u8.stride(0),
                    valid_u8.stride(1),
                    g.stride(0),
                    g.stride(1),
                    1.0 / tau_p,
                    PRECISION=_precision(z.dtype),
                    UPCAST=_upcast(z.dtype),
                    **fixed,
                )
                drc = dr[:nb].view(-1, n_anc)
                zc = z[b0 : b0 + nb, :t_end]
                if dan is not None:
                    dan += _mm_f32(drc.T, zc.reshape(-1, dim).to(dr_dtype))
                if dz is not None:
                    gz = (drc @ an_op.to(dr_dtype)).view(nb, t_end, dim).float()
                    zf = zc.float()
                    inv = tok_inv[b0 : b0 + nb]
                    coef = inv * inv * (zf * gz).sum(dim=-1) * (inv < 1.0 / EPS)
                    dz[b0 : b0 + nb, :t_end] = gz.sub_(zf * coef[:, :, None])
        da = None
        if dan is not None:
            dot = (an * dan).sum(dim=-1, keepdim=True) * (a_norm > EPS)[:, None]
            da = ((dan - an * dot) * a_inv[:, None]).to(anchor_dtype)
        return dz, None, da, None


def anchor_profiles_triton(tokens: Tensor, mask: Tensor, anchors: Tensor, tau_p: float) -> Tensor:
    """Profiles p [B, K] in float32 via the Triton kernels; tokens float16/bfloat16/float32, anchors float32."""
    if not AVAILABLE:
        raise RuntimeError("triton is not installed; use backend='torch'")
    if torch.float64 in (tokens.dtype, anchors.dtype):
        raise TypeError("the Triton path takes 16/32-bit floats; float64 goes to the torch path")
    if not (tokens.is_cuda or interpreting()):
        raise RuntimeError("the Triton path needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return _TritonProfiles.apply(tokens, mask, anchors, tau_p)
