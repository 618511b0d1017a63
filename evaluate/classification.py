"""Zero-shot classification: class prompts -> classifier, images -> logits, clip_benchmark's acc1 / acc5 / balanced
accuracy. Images are embedded shard block by shard block; only the [N, C] logits are kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipe_align.evaluate.loading import EvalContext, class_weights, image_rows, is_background, row_blocks
from pipe_align.evaluate.metrics import classification_metrics
from pipe_align.extract.errors import PipeError


@torch.no_grad()
def run_classification(ctx: EvalContext) -> dict[str, Any]:
    img, aligner, device = ctx.image, ctx.aligner, ctx.cfg.device
    weights, classes = class_weights(ctx)
    if img.layout.classes and list(img.layout.classes) != classes:
        raise PipeError(f"{img.path} and {ctx.text.path} list different classes; re-extract one of them")
    labels = img["labels"][:].astype(np.int64)
    keep = (labels >= 0) & ~img["skipped"][:].astype(bool)
    if not keep.any():
        raise PipeError(f"{img.path}: no labelled images in {ctx.cfg.dataset}/{ctx.cfg.split} (labels are all -1 "
                        "or every row was skipped); classification needs a labelled set")
    if labels[keep].max() >= len(classes):
        raise PipeError(f"{img.path}: label {labels[keep].max()} outside the {len(classes)} prompt classes")
    # VOC-style sets list "background" first but never label an image with it: it is no classification answer
    drop_bg = is_background(classes) and not (labels[keep] == 0).any()
    cand = torch.arange(1 if drop_bg else 0, len(classes))
    w = weights[cand].to(device)
    logits = []
    for start, stop in row_blocks(img, tokens=aligner.needs_tokens):
        k = keep[start:stop]
        if not k.any():
            continue
        emb = aligner.image_global(image_rows(img, start, stop, aligner.needs_tokens, device))
        logits.append((emb[torch.from_numpy(k).to(emb.device)].float() @ w.T).cpu())
    y = torch.from_numpy(labels[keep] - int(cand[0]))
    logits = torch.cat(logits)
    out: dict[str, Any] = classification_metrics(logits, y)
    pred = logits.argmax(1)
    for j, c in enumerate(cand.tolist()):  # per-class recall (seen vs unseen classes in transfer checks)
        hit = pred[y == j] == j
        if len(hit):
            out[f"acc/{classes[c]}"] = float(hit.float().mean())
    out |= {"images": int(keep.sum()), "classes": len(cand), "background_excluded": drop_bg}
    return out
