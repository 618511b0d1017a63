"""Image-text retrieval recall (clip_benchmark's definition: a query hits when any positive is in its top k), blocked.

It lives in align/ because training selects on held-out retrieval and evaluation reports it: both import it from here
(evaluate/metrics.py re-exports it). See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def as_long(x: Tensor | np.ndarray | Sequence[int], name: str) -> Tensor:
    """Integer label/prediction arrays of any integer dtype (uint8 PNG masks included) as int64 tensors."""
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.long()


def as_float(x: Tensor) -> Tensor:
    """Half/bfloat16 store rows become float32; float64 stays float64 (tests compare against float64 brute force)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def blocked_topk(queries: Tensor, keys: Tensor, k: int, block: int = 1024) -> tuple[Tensor, Tensor]:
    """Top-k of ``queries @ keys.T`` per query row, computed ``block`` query rows at a time.

    Only one [block, K] similarity buffer exists (allocated once, reused), so 25k x 5k (or larger) retrieval needs
    ``block * K * 4`` bytes of working memory instead of the dense matrix. Scores are in the inputs' dtype (callers
    pass float32). Ties are resolved by ``torch.topk`` (as clip_benchmark does): arbitrary, but deterministic for
    given inputs.

    Returns:
        (values, indices), each [Q, k], sorted by decreasing score.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"expected queries [Q, E] and keys [K, E], got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if not 0 < k <= keys.shape[0]:
        raise ValueError(f"k={k} must lie in [1, {keys.shape[0]}] (the number of keys)")
    if block < 1:
        raise ValueError("block must be >= 1")
    q = queries.shape[0]
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    queries, keys = queries.to(dtype), keys.to(dtype)
    values = torch.empty(q, k, dtype=dtype, device=queries.device)
    indices = torch.empty(q, k, dtype=torch.long, device=queries.device)
    sims = torch.empty(min(block, q), keys.shape[0], dtype=dtype, device=queries.device)  # reused: no heap churn
    keys_t = keys.t()
    for s in range(0, q, block):
        e = min(s + block, q)
        blk = sims[: e - s]
        torch.mm(queries[s:e], keys_t, out=blk)
        torch.topk(blk, k, dim=1, largest=True, sorted=True, out=(values[s:e], indices[s:e]))
    return values, indices


def blocked_topk_both(
    queries: Tensor, keys: Tensor, k_rows: int, k_cols: int, block: int = 1024
) -> tuple[Tensor, Tensor]:
    """Top-k in both directions of ``S = queries @ keys.T`` from ONE blocked pass over the query rows.

    Per block of ``block`` query rows, the [block, K] similarity block gives each query row its top ``k_rows`` keys
    directly, and each key its top ``k_cols`` queries within the block; those per-key candidates are collected in a
    fixed [K, ~17 k_cols] buffer and reduced by one top-k whenever it fills, so memory stays bounded for any Q.
    Retrieval needs both directions of the same matrix; computing it once halves the GEMM work that dominates the
    cost, and only a [block, K] block is ever alive. Exactly tied scores may be ordered differently than one
    ``torch.topk`` over the full row/column would order them (ties are ``torch.topk``'s choice either way).

    Returns:
        (row_indices [Q, k_rows] into keys, col_indices [K, k_cols] into queries), each sorted by decreasing score.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"expected queries [Q, E] and keys [K, E], got {tuple(queries.shape)} and {tuple(keys.shape)}")
    q, n = queries.shape[0], keys.shape[0]
    if not (0 < k_rows <= n and 0 < k_cols <= q):
        raise ValueError(f"k_rows={k_rows} must lie in [1, {n}] and k_cols={k_cols} in [1, {q}]")
    if block < 1:
        raise ValueError("block must be >= 1")
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    dev = queries.device
    queries, keys = queries.to(dtype), keys.to(dtype)
    row_idx = torch.empty(q, k_rows, dtype=torch.long, device=dev)
    # All working memory is allocated once and reused: a fresh [block, K] block per iteration interleaved with
    # small long-lived tensors fragments glibc's heap, and RSS then grows by a block per iteration (seen: +400 MB
    # at 25k x 5k). Per-key candidates from each block go into a fixed [K, cap] buffer that is reduced to its
    # top k_cols (one topk over all of it) when full: cheaper than merging after every block.
    b0 = min(block, q)
    sims = torch.empty(b0, n, dtype=dtype, device=dev)
    kb_max = min(k_cols, b0)
    cap = k_cols + max(16 * k_cols, 256)
    cand_v = torch.empty(n, cap, dtype=dtype, device=dev)
    cand_i = torch.empty(n, cap, dtype=torch.long, device=dev)
    width = 0

    def reduce_candidates(w: int) -> int:
        kk = min(k_cols, w)
        v, j = torch.topk(cand_v[:, :w], kk, dim=1, largest=True, sorted=True)
        i = torch.gather(cand_i[:, :w], 1, j)
        cand_v[:, :kk], cand_i[:, :kk] = v, i
        return kk

    keys_t = keys.t()
    for s in range(0, q, block):
        e = min(s + block, q)
        blk = sims[: e - s]
        torch.mm(queries[s:e], keys_t, out=blk)
        row_idx[s:e] = torch.topk(blk, k_rows, dim=1, largest=True, sorted=True).indices
        if width + kb_max > cap:
            width = reduce_candidates(width)
        v, i = torch.topk(blk, min(k_cols, e - s), dim=0, largest=True, sorted=True)  # [kb, K]
        kb = v.shape[0]
        cand_v[:, width : width + kb] = v.t()
        cand_i[:, width : width + kb] = i.t() + s
        width += kb
    width = reduce_candidates(width)
    col_idx = cand_i[:, :k_cols].clone()
    return row_idx, col_idx


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block: int = 1024,
) -> dict[str, float]:
    """Image-text retrieval recall@k with clip_benchmark's names and definitions.

    - ``image_retrieval_recall@k``: each caption is a query over all images; a hit when its image is among the
      top k. Averaged over captions.
    - ``text_retrieval_recall@k``: each image is a query over all captions; a hit when ANY of its captions is among
      the top k (the CLIP-paper convention, clip_benchmark's ``recall > 0``). Averaged over the images that have a
      caption: an image without one has nothing to retrieve (its recall is 0/0), so it is no query here, though it
      stays a candidate for the captions' queries. clip_benchmark's code would count it as a miss (NaN > 0 is
      false), which never happens on its data (every image has captions); docs/metrics.md.

    Embeddings are L2-normalised here (cosine similarity), in float32 (float64 input stays float64). Top-k uses
    ``torch.topk`` indices exactly as clip_benchmark, so among exactly tied scores which item enters the top k is
    ``torch.topk``'s choice; one ``topk(max(ks))`` per block serves every k (its sorted prefix). When k exceeds the
    number of candidates, every query hits (k is clipped to the candidate count). Both directions come from one
    blocked pass over caption rows (``blocked_topk_both``).

    Args:
        image_emb: [N, E] one row per image.
        text_emb: [M, E] one row per caption.
        text_to_image: [M] image row of each caption (the text store's ``item``).
        ks: the k values to report.
        block: caption rows per similarity block (working memory ``block * N * 4`` bytes plus an [N, ~17 max(ks)]
            candidate buffer: about 36 MB in all at N = 5000, block 1024, float32).
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"expected image_emb [N, E] and text_emb [M, E], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    t2i = as_long(text_to_image, "text_to_image").to(text_emb.device)
    if t2i.shape != (m,):
        raise ValueError(f"text_to_image must be [M={m}], got {tuple(t2i.shape)}")
    if n == 0 or m == 0:
        raise ValueError("need at least one image and one caption")
    if t2i.min() < 0 or t2i.max() >= n:
        raise ValueError(f"text_to_image values must lie in [0, {n})")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    img = F.normalize(as_float(image_emb), dim=-1)
    txt = F.normalize(as_float(text_emb), dim=-1).to(img.device, img.dtype)
    t2i = t2i.to(img.device)
    kmax = max(ks)

    # one pass over caption blocks serves both directions (captions are the larger side in every standard set)
    txt_top, img_top = blocked_topk_both(txt, img, min(kmax, n), min(kmax, m), block)
    # text -> image: a caption hits when its one image is in its top k
    img_hit = txt_top == t2i.unsqueeze(1)  # [M, k']: at most one True per row
    # image -> text: an image hits when any caption of it is in its top k
    txt_hit = t2i[img_top] == torch.arange(n, device=img.device).unsqueeze(1)  # [N, k']
    txt_hit = txt_hit[torch.bincount(t2i, minlength=n) > 0]  # queries: the images with at least one caption

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = img_hit[:, :k].any(dim=1).double().mean().item()
        out[f"text_retrieval_recall@{k}"] = txt_hit[:, :k].any(dim=1).double().mean().item()
    return out
