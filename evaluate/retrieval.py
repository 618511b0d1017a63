"""Image-text retrieval on a caption store: clip_benchmark's recall@k both ways, from metrics' blocked top-k.

Skipped (unreadable) images leave the evaluation together with their captions; caption links are re-indexed. Images
without a caption are no image->text queries (nothing to find) but stay text->image candidates; the result says how
many there were (`images_without_captions`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError

from . import figures
from .base import Task, register_task
from .config import figure_path
from .context import EvalContext
from .dataset import figure_images
from .loading import embed_images, embed_texts
from .metrics import blocked_topk, retrieval_metrics


def retrieval_inputs(ctx: EvalContext) -> tuple[Tensor, Tensor, Tensor, np.ndarray, np.ndarray]:
    """(image emb [N', E], caption emb [M', E], caption -> image [M'], kept image rows, kept caption rows)."""
    img, txt = ctx.image, ctx.text
    n = img.layout.count
    item = txt.read("item").astype(np.int64)
    if len(item) and (item.min() < 0 or item.max() >= n):
        bad = int(np.flatnonzero((item < 0) | (item >= n))[0])
        raise PipeError(f"{txt.path}: caption row {bad} links to image {item[bad]}, outside 0..{n - 1} ({img.path})")
    keep = ~img.read("skipped").astype(bool)
    cap_keep = keep[item]
    if not keep.any() or not cap_keep.any():
        raise PipeError(f"{img.path}: no image with a caption to evaluate in {ctx.cfg.dataset}/{ctx.cfg.split}")
    new_index = np.cumsum(keep) - 1
    image_emb = embed_images(ctx.aligner, img, ctx.cfg.device)[torch.from_numpy(keep)]
    text_emb = embed_texts(ctx.aligner, txt, ctx.cfg.device)[torch.from_numpy(cap_keep)]
    links = torch.from_numpy(new_index[item[cap_keep]])
    return image_emb, text_emb, links, np.flatnonzero(keep), np.flatnonzero(cap_keep)


def run_retrieval(ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics, plus the top captions of the first few images (for the examples figure)."""
    image_emb, text_emb, links, img_rows, cap_rows = retrieval_inputs(ctx)
    out: dict[str, Any] = retrieval_metrics(image_emb, text_emb, links, ks=(1, 5, 10))
    uncaptioned = int((torch.bincount(links, minlength=len(img_rows)) == 0).sum())
    out |= {"images": len(img_rows), "captions": len(cap_rows), "images_without_captions": uncaptioned}
    q = min(ctx.cfg.examples, len(img_rows))
    k = min(5, len(cap_rows))
    values, idx = blocked_topk(image_emb[:q], text_emb, k)
    texts = ctx.text.read("text")  # 1-D strings: small next to the token arrays
    examples = {
        "rows": img_rows[:q].tolist(),
        "captions": [[str(texts[int(cap_rows[j])]) for j in row] for row in idx.tolist()],
        "hits": [[int(links[j]) == i for j in row] for i, row in enumerate(idx.tolist())],
        "scores": values.tolist(),
    }
    return out, examples


@register_task("retrieval")
class RetrievalTask(Task):
    """Image-text retrieval with the caption store: recall@1/5/10 both ways."""

    text = "captions"
    columns = (
        ("text_retrieval_recall@1", "I2T R@1"),
        ("text_retrieval_recall@5", "I2T R@5"),
        ("image_retrieval_recall@1", "T2I R@1"),
        ("image_retrieval_recall@5", "T2I R@5"),
    )
    report_rank = 20

    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return run_retrieval(ctx)

    def figures(self, ctx: EvalContext, result: dict[str, Any], extras: dict[str, Any], notes: list[str]) -> list[Path]:
        """`examples`: image queries with their top captions, captions of the query marked."""
        if not extras["rows"]:
            return []
        images = figure_images(ctx, extras["rows"], notes)
        samples = list(zip(images, extras["captions"], extras["hits"], extras["scores"], strict=True))
        title = f"image -> text, {self.figure_title(ctx, result)}"
        return [figures.retrieval_examples(figure_path(ctx.cfg, "examples"), samples, title)]
