"""The falsification test the PAL paper states for its own claim: "if gains over global baselines vanish when those
[similarity] patterns do not align with the true matches, the claim is falsified."

Per image of a split with phrase boxes: PAL's gain over the best global baseline (the baseline with the highest mean
image->text R@1 on the split) in image->text retrieval rank (the baseline's rank of the image's best-ranked own
caption minus PAL's; positive = PAL ranks it higher), against PAL's grounding accuracy on that image (the share of
its phrases whose heat-map maximum falls in a box). Reported: Spearman's rank correlation with a permutation p-value,
and the mean gain on images where grounding fails (accuracy < 0.5) and where it succeeds (>= 0.5). The claim holds
on the data when the correlation is positive (p < 0.05) and the gain where grounding fails is below the gain where
it succeeds; otherwise it does not hold (gains that persist where grounding fails are not explained by
correspondence).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipe_align.extract.errors import PipeError

from .config import EvalConfig
from .context import load_context
from .grounding import run_grounding
from .metrics import retrieval_metrics
from .retrieval import retrieval_inputs

PERMUTATIONS = 2000
FAILS_BELOW = 0.5


def rank_of_best_positive(image_emb: torch.Tensor, text_emb: torch.Tensor, links: torch.Tensor) -> np.ndarray:
    """[N] 1-based rank, among all captions, of each image's highest-scoring own caption (image -> text)."""
    ranks = np.empty(len(image_emb), dtype=np.int64)
    for start in range(0, len(image_emb), 256):
        scores = image_emb[start : start + 256].float() @ text_emb.float().T  # [b, M]
        own = links[None, :] == torch.arange(start, start + len(scores))[:, None]
        best = scores.masked_fill(~own, float("-inf")).max(1).values
        ranks[start : start + len(scores)] = ((scores > best[:, None]).sum(1) + 1).numpy()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (ties share their mean rank)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(1, len(x) + 1)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def permutation_p(a: np.ndarray, b: np.ndarray, rho: float, seed: int) -> float:
    """One-sided p-value of rho > 0: the share of PERMUTATIONS shuffles of b whose rho is at least as large."""
    if not np.isfinite(rho):
        return float("nan")
    rng = np.random.default_rng(seed)
    count = sum(spearman(a, rng.permutation(b)) >= rho for _ in range(PERMUTATIONS))
    return float((count + 1) / (PERMUTATIONS + 1))


def falsification(cfg: EvalConfig, pal_run: str, baseline_runs: list[str]) -> dict[str, Any]:
    """The per-image test on cfg's dataset/split (task fields of cfg are replaced); a flat dict with the verdict."""
    if not baseline_runs:
        raise PipeError("the falsification test needs at least one baseline run (--baseline)")
    base = replace(cfg, task="retrieval", protocol=None, figures=False)
    pal = load_context(replace(base, run=pal_run), "captions")
    pal_img, pal_txt, links, img_rows, _ = retrieval_inputs(pal)
    pal_rank = rank_of_best_positive(pal_img, pal_txt, links)
    best, best_r1, best_rank = None, -1.0, None
    for run in baseline_runs:
        ctx = load_context(replace(base, run=run), "captions")
        img, txt, lk, rows, _ = retrieval_inputs(ctx)
        if not np.array_equal(rows, img_rows):
            raise PipeError(f"--baseline {run}: its stores keep other images than {pal_run}'s")
        r1 = retrieval_metrics(img, txt, lk, ks=(1,))["text_retrieval_recall@1"]
        if r1 > best_r1:
            best, best_r1, best_rank = ctx.method + f" ({run})", r1, rank_of_best_positive(img, txt, lk)
    ground_ctx = load_context(replace(cfg, task="grounding", protocol=None, figures=False, run=pal_run), "captions")
    metrics, extras = run_grounding(ground_ctx)
    per_image = extras["per_image"]
    position = {int(r): i for i, r in enumerate(img_rows)}
    use = [r for r in per_image if r in position]
    if len(use) < 3:
        raise PipeError(f"{cfg.dataset}/{cfg.split}: only {len(use)} images with grounded phrases; need at least 3")
    gain = np.array([best_rank[position[r]] - pal_rank[position[r]] for r in use], float)
    acc = np.array([np.mean(per_image[r]) for r in use], float)
    rho = spearman(gain, acc)
    p = permutation_p(gain, acc, rho, cfg.seed)
    fails, works = gain[acc < FAILS_BELOW], gain[acc >= FAILS_BELOW]
    out = {
        "best_baseline": best,
        "best_baseline_r1": best_r1,
        "images": len(use),
        "spearman": rho,
        "spearman_p": p,
        "pointing_acc": metrics["pointing_acc"],
        "chance": metrics["chance"],
        "mean_gain": float(gain.mean()),
        "images_grounding_fails": len(fails),
        "images_grounding_works": len(works),
        "mean_gain_grounding_fails": float(fails.mean()) if len(fails) else None,
        "mean_gain_grounding_works": float(works.mean()) if len(works) else None,
    }
    holds = bool(
        np.isfinite(rho) and rho > 0 and p < 0.05 and len(fails) and len(works) and fails.mean() < works.mean()
    )
    out["holds"] = holds
    out["gains_persist_where_grounding_fails"] = bool(len(fails) and fails.mean() > 0)
    return out
