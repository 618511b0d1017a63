"""Anchor collapse: are the per-token similarity vectors near-constant within a sample?

For a sample (an image's patches, a caption's valid word tokens) and an anchor bank, R[t, k] = cos(token t, anchor k).
The within-sample variance is mean_k Var_t R[t, k] (population variance over the sample's tokens, averaged over the
K anchors), averaged over samples. Collapse means it is small next to two references:
- shuffled: the same tokens regrouped at random across samples (same group sizes; a seeded permutation), so a
  "sample" holds tokens of many samples: the variance that modality-level statistics alone would give;
- untrained: the run's anchors at their initial draw (same seed, same shapes), so what training changed shows.
Keys per side (image, text): `<side>_within_var`, `<side>_shuffled_var`, `<side>_untrained_var`, and the ratios
`<side>_within_over_shuffled` (1: a sample's tokens spread as much as random tokens of the modality; near 0: the
vectors are near-constant within a sample) and `<side>_within_over_untrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipe_align.align.base import l2n
from pipe_align.align.pal import PAL
from pipe_align.extract.errors import PipeError

from . import figures
from .base import Task, register_task
from .config import figure_path
from .context import EvalContext
from .diagnostics import anchors_of
from .loading import row_blocks, text_rows

MAX_SAMPLES = 2000  # samples per side: the statistic is a mean; more adds time, not information


def within_variance(sims: Tensor, mask: Tensor) -> Tensor:
    """[N] mean over anchors of the population variance over each sample's valid tokens (sims [N, T, K], mask [N, T]
    bool). A sample with one token has variance 0."""
    m = mask.to(sims.dtype)[..., None]
    n = m.sum(1).clamp(min=1.0)
    mean = (sims * m).sum(1) / n
    var = (((sims - mean[:, None, :]) ** 2) * m).sum(1) / n
    return var.mean(1)


def shuffled(tokens: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
    """The valid tokens of every sample, permuted across samples and put back into the same valid slots."""
    out = tokens.clone()
    flat = tokens[mask]
    out[mask] = flat[torch.randperm(len(flat), generator=generator)]
    return out


def _sims(tokens: Tensor, anchors: Tensor) -> Tensor:
    return l2n(tokens) @ l2n(anchors).T.to(tokens.device)


@torch.no_grad()
def side_stats(batches: list[tuple[Tensor, Tensor]], trained: Tensor, untrained: Tensor, seed: int) -> dict[str, Any]:
    """Per-sample within variance for trained anchors, the shuffled control and untrained anchors."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[Tensor]] = {"within": [], "shuffled": [], "untrained": []}
    for tokens, mask in batches:
        out["within"].append(within_variance(_sims(tokens, trained), mask).cpu())
        out["shuffled"].append(within_variance(_sims(shuffled(tokens.cpu(), mask.cpu(), g), trained.cpu()), mask.cpu()))
        out["untrained"].append(within_variance(_sims(tokens, untrained), mask).cpu())
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def untrained_anchors(ctx: EvalContext, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """The run's anchors at their initial draw: PAL's own initialisation with the run's seed."""
    run = ctx.meta.get("run") if isinstance(ctx.meta.get("run"), dict) else {}
    seed = int(run.get("seed", 0) or 0)
    fresh = PAL(ctx.aligner.config, image_dim=image.shape[1], text_dim=text.shape[1], seed=seed)
    return fresh.image_anchors, fresh.text_anchors


def run_collapse(ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
    a_img, a_txt = anchors_of(ctx.aligner)
    if a_txt is None or not isinstance(ctx.aligner, PAL):
        raise PipeError(f"method {ctx.aligner.name!r}: `pipe eval collapse` needs both anchor banks of a PAL run")
    u_img, u_txt = untrained_anchors(ctx, a_img, a_txt)
    img, txt, device, n = ctx.image, ctx.text, ctx.cfg.device, MAX_SAMPLES
    keep = ~img.read("skipped").astype(bool)
    ib, tb = [], []
    for start, stop in row_blocks(img, tokens=True):
        if start >= n:
            break
        p = img.rows("patches", start, min(stop, n)).float().to(device)
        k = torch.from_numpy(keep[start : min(stop, n)]).to(device)
        ib.append((p[k], torch.ones(p[k].shape[:2], dtype=torch.bool, device=device)))
    for start, stop in row_blocks(txt, tokens=True):
        if start >= n:
            break
        rows = text_rows(txt, start, min(stop, n), True, device)
        tb.append((rows.tokens, rows.mask()))
    seed = ctx.cfg.seed
    sides = {"image": side_stats(ib, a_img, u_img, seed), "text": side_stats(tb, a_txt, u_txt, seed + 1)}
    out: dict[str, Any] = {}
    for side, s in sides.items():
        w, sh, un = (float(s[k].mean()) for k in ("within", "shuffled", "untrained"))
        out |= {
            f"{side}_within_var": w,
            f"{side}_shuffled_var": sh,
            f"{side}_untrained_var": un,
            f"{side}_within_over_shuffled": w / sh if sh > 0 else float("nan"),
            f"{side}_within_over_untrained": w / un if un > 0 else float("nan"),
            f"{side}_samples": len(s["within"]),
        }
    out["anchors"] = int(a_img.shape[0])
    return out, sides


@register_task("collapse")
class CollapseTask(Task):
    """PAL: within-sample variance of the token similarity vectors, against a shuffled control and untrained anchors."""

    text = "captions"
    columns = (("image_within_over_shuffled", "img var/shuf"), ("text_within_over_shuffled", "txt var/shuf"))
    report_tag = "coll"
    report_rank = 50

    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return run_collapse(ctx)

    def figures(self, ctx: EvalContext, result: dict[str, Any], extras: dict[str, Any], notes: list[str]) -> list[Path]:
        """`variance`: per side, histograms of the per-sample variance (trained, shuffled, untrained)."""
        title = f"within-sample variance of token similarity vectors, {self.figure_title(ctx, result)}"
        return [figures.collapse_histograms(figure_path(ctx.cfg, "variance"), extras, title)]
