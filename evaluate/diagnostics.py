"""Diagnostics of anchor methods (PAL): are the anchors used, do matched image and caption profiles activate the
same anchors, and where in an image does an anchor fire.

- anchor usage: for every token, the anchor of highest cosine (argmax over K); counts per anchor, how many anchors
  are ever used, the normalised entropy of the usage (1 = uniform), the share of the busiest anchor. Image side from
  `image_dense` (PAL: cos(patch, anchor)); text side from the text anchors when the method exposes them.
- top-5 anchor Dice: Dice of the top-5 anchor index sets of an image profile (`image_global`, K dims) and a caption
  profile (`text_global`): matched = the image's first caption, mismatched = a seeded random caption of another
  image. With equal set sizes Dice = |A & B| / 5. A working alignment gives matched >> mismatched.
- activation maps: for a few images, the cos maps of the anchors with the largest profile values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipe_align.align.base import l2n
from pipe_align.extract.errors import PipeError

from . import figures
from .base import Task, register_task
from .config import figure_path
from .context import EvalContext
from .dataset import figure_images
from .loading import embed_texts, image_rows, row_blocks, text_rows

TOP = 5
MAPS_PER_IMAGE = 3


def anchors_of(aligner) -> tuple[Tensor, Tensor | None]:
    """(image anchors [K, D], text anchors or None); methods without anchors cannot be diagnosed."""
    a = getattr(aligner, "image_anchors", None)
    if not isinstance(a, Tensor) or a.ndim != 2 or a.shape[0] == 0:
        raise PipeError(f"method {aligner.name!r} has no anchors; `pipe eval diagnostics` is for anchor methods (pal)")
    t = getattr(aligner, "text_anchors", None)
    return a, t if isinstance(t, Tensor) and t.ndim == 2 and t.shape[0] == a.shape[0] else None


def usage_stats(counts: np.ndarray, prefix: str) -> dict[str, float]:
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    k = len(counts)
    entropy = float(-(p * np.log(p)).sum() / math.log(k)) if k > 1 and total else float("nan")
    return {
        f"{prefix}_anchors_used": int((counts > 0).sum()),
        f"{prefix}_anchors_used_frac": float((counts > 0).mean()),
        f"{prefix}_usage_entropy": entropy,
        f"{prefix}_max_share": float(counts.max() / total) if total else float("nan"),
    }


def topk_dice(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Per row, Dice of the top-k index sets of a and b ([n, K] each): 2|A & B| / (|A| + |B|) = |A & B| / k."""
    ia = torch.topk(a, k, dim=1).indices
    ib = torch.topk(b, k, dim=1).indices
    return (ia[:, :, None] == ib[:, None, :]).any(dim=2).sum(dim=1).double() / k


@torch.no_grad()
def image_pass(ctx: EvalContext, k: int, keep: np.ndarray) -> tuple[np.ndarray, Tensor]:
    """One read of the patch store: per-anchor argmax counts over the kept images' patches, and every row's profile
    h [N, K] on the CPU (skipped rows included; callers drop them)."""
    img, counts, profiles = ctx.image, torch.zeros(k, dtype=torch.long), []
    for start, stop in row_blocks(img):
        rows = image_rows(img, start, stop, True, ctx.cfg.device)
        profiles.append(ctx.aligner.image_global(rows).float().cpu())
        sel = torch.from_numpy(keep[start:stop])
        if not sel.any():
            continue
        dense = ctx.aligner.image_dense(rows.patches.float())[sel.to(rows.patches.device)]
        if dense.shape[-1] != k:
            raise PipeError(f"method {ctx.aligner.name!r}: image_dense gives {dense.shape[-1]} dims, not K={k}")
        counts += torch.bincount(dense.argmax(dim=-1).flatten().cpu(), minlength=k)
    return counts.numpy(), torch.cat(profiles)


@torch.no_grad()
def text_usage(ctx: EvalContext, anchors: Tensor) -> np.ndarray:
    txt, k = ctx.text, anchors.shape[0]
    a = l2n(anchors).to(ctx.cfg.device)
    counts = torch.zeros(k, dtype=torch.long)
    for start, stop in row_blocks(txt):
        rows = text_rows(txt, start, stop, True, ctx.cfg.device)
        best = (l2n(rows.tokens) @ a.T).argmax(dim=-1)  # [m, L]
        counts += torch.bincount(best[rows.mask()].cpu(), minlength=k)
    return counts.numpy()


def pick_pairs(item: np.ndarray, keep_img: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image rows, matched caption rows, mismatched caption rows): first caption of each image with one, and a
    seeded random caption of another image."""
    valid = keep_img[item]
    first: dict[int, int] = {}
    for row in np.flatnonzero(valid):
        first.setdefault(int(item[row]), int(row))
    images = np.array(sorted(first), dtype=np.int64)
    if len(images) < 2:
        raise PipeError("diagnostics need at least two images with captions")
    matched = np.array([first[i] for i in images], dtype=np.int64)
    pool = np.flatnonzero(valid)
    rng = np.random.default_rng(seed)
    mismatched = np.empty_like(matched)
    for n, i in enumerate(images):
        while True:  # terminates: at least two images have captions
            c = int(pool[rng.integers(len(pool))])
            if item[c] != i:
                mismatched[n] = c
                break
    return images, matched, mismatched


@torch.no_grad()
def run_diagnostics(ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics, plus what the figures need (usage counts, Dice values, rows for the activation maps)."""
    img_anchors, txt_anchors = anchors_of(ctx.aligner)
    k = img_anchors.shape[0]
    top = min(TOP, k)
    keep = ~ctx.image.read("skipped").astype(bool)
    if not keep.any():
        raise PipeError(f"{ctx.image.path}: every image was skipped; nothing to diagnose")
    out: dict[str, Any] = {"anchors": k}
    img_counts, h_img = image_pass(ctx, k, keep)
    out |= usage_stats(img_counts, "image")
    txt_counts = text_usage(ctx, txt_anchors) if txt_anchors is not None else None
    if txt_counts is not None:
        out |= usage_stats(txt_counts, "text")

    item = ctx.text.read("item").astype(np.int64)
    if len(item) and (item.min() < 0 or item.max() >= len(keep)):
        raise PipeError(f"{ctx.text.path}: caption links outside the {len(keep)} images of {ctx.image.path}")
    images, matched, mismatched = pick_pairs(item, keep, ctx.cfg.seed)
    h_txt = embed_texts(ctx.aligner, ctx.text, ctx.cfg.device)
    if h_img.shape[1] != k or h_txt.shape[1] != k:
        raise PipeError(f"method {ctx.aligner.name!r}: profiles have {h_img.shape[1]}/{h_txt.shape[1]} dims, not {k}")
    hi = h_img[torch.from_numpy(images)]
    d_match = topk_dice(hi, h_txt[torch.from_numpy(matched)], top)
    d_mis = topk_dice(hi, h_txt[torch.from_numpy(mismatched)], top)
    out |= {
        f"dice_top{top}_matched": d_match.mean().item(),
        f"dice_top{top}_mismatched": d_mis.mean().item(),
        f"dice_top{top}_gap": (d_match - d_mis).mean().item(),
        "pairs": len(images),
    }

    rows = images[: ctx.cfg.examples]
    samples = []
    h, w = ctx.image.layout.grid
    for row in rows:  # a few single rows: never the whole token array
        dense = ctx.aligner.image_dense(ctx.image.rows("patches", int(row), int(row) + 1).float().to(ctx.cfg.device))
        vals, idx = torch.topk(h_img[row], min(MAPS_PER_IMAGE, k))
        samples.append((int(row), idx.tolist(), vals.tolist(), dense[0].cpu()[:, idx].T.reshape(-1, h, w).numpy()))
    extras = {
        "image_counts": img_counts,
        "text_counts": txt_counts,
        "dice_matched": d_match.numpy(),
        "dice_mismatched": d_mis.numpy(),
        "maps": samples,
    }
    return out, extras


@register_task("diagnostics")
class DiagnosticsTask(Task):
    """Anchor methods only: anchor usage, top-5 anchor Dice (matched vs mismatched pairs), activation maps."""

    text = "captions"
    columns = (("dice_top5_matched", "Dice@5 matched"), ("dice_top5_mismatched", "Dice@5 mismatched"))
    report_tag = "diag"
    report_rank = 40

    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return run_diagnostics(ctx)

    def figures(self, ctx: EvalContext, result: dict[str, Any], extras: dict[str, Any], notes: list[str]) -> list[Path]:
        """`anchor-usage`, `dice` (matched vs mismatched histogram) and `anchor-maps`."""
        cfg, label = ctx.cfg, self.figure_title(ctx, result)
        out = [
            figures.anchor_usage(
                figure_path(cfg, "anchor-usage"),
                extras["image_counts"],
                extras["text_counts"],
                f"anchor usage, {label}",
            )
        ]
        top = max(1, min(TOP, result["anchors"]))
        out.append(
            figures.dice_histogram(
                figure_path(cfg, "dice"),
                extras["dice_matched"],
                extras["dice_mismatched"],
                top,
                f"top-{top} anchor Dice, {label}",
            )
        )
        maps = extras["maps"]
        if maps:
            images = figure_images(ctx, [row for row, _, _, _ in maps], notes)
            samples = [(image, ids, vals, m) for image, (_, ids, vals, m) in zip(images, maps, strict=True)]
            out.append(figures.anchor_maps(figure_path(cfg, "anchor-maps"), samples, f"anchor activations, {label}"))
        return out
