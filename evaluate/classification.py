"""Zero-shot classification: class prompts -> classifier, images -> logits, clip_benchmark's acc1 / acc5 / balanced
accuracy. Images are embedded shard block by shard block; only the [N, C] logits are kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipe_align.extract.datasets import dataset_class
from pipe_align.extract.errors import PipeError
from pipe_align.extract.remote import location
from pipe_align.extract.store import open_store

from .base import Task, register_task
from .context import EvalContext
from .dataset import reader_class
from .loading import image_rows, row_blocks
from .metrics import classification_metrics
from .prompts import class_weights


@torch.no_grad()
def run_classification(ctx: EvalContext) -> dict[str, Any]:
    img, aligner, device = ctx.image, ctx.aligner, ctx.cfg.device
    weights, classes = class_weights(ctx)
    if img.layout.classes and list(img.layout.classes) != classes:
        raise PipeError(f"{img.path} and {ctx.text.path} list different classes; re-extract one of them")
    labels = img.read("labels").astype(np.int64)
    keep = (labels >= 0) & ~img.read("skipped").astype(bool)
    if not keep.any():
        raise PipeError(
            f"{img.path}: no labelled images in {ctx.cfg.dataset}/{ctx.cfg.split} (labels are all -1 "
            "or every row was skipped); classification needs a labelled set"
        )
    if labels[keep].max() >= len(classes):
        raise PipeError(f"{img.path}: label {labels[keep].max()} outside the {len(classes)} prompt classes")
    # a background class (the reader says which) is no answer to "what is this image of" unless images carry it
    bg = reader_class(img).background
    drop_bg = bg is not None and bg < len(classes) and not (labels[keep] == bg).any()
    cand = torch.tensor([c for c in range(len(classes)) if not (drop_bg and c == bg)])
    position = np.full(len(classes), -1, np.int64)
    position[cand.numpy()] = np.arange(len(cand))
    w = weights[cand].to(device)
    logits = []
    for start, stop in row_blocks(img, tokens=aligner.needs_tokens):
        k = keep[start:stop]
        if not k.any():
            continue
        emb = aligner.image_global(image_rows(img, start, stop, aligner.needs_tokens, device))
        logits.append((emb[torch.from_numpy(k).to(emb.device)].float() @ w.T).cpu())
    y = torch.from_numpy(position[labels[keep]])
    logits = torch.cat(logits)
    out: dict[str, Any] = classification_metrics(logits, y)
    pred = logits.argmax(1)
    for j, c in enumerate(cand.tolist()):  # per-class recall (seen vs unseen classes in transfer checks)
        hit = pred[y == j] == j
        if len(hit):
            out[f"acc/{classes[c]}"] = float(hit.float().mean())
    out |= {"images": int(keep.sum()), "classes": len(cand), "background_excluded": drop_bg}
    seen = trained_classes(ctx)
    if seen is not None:
        out |= seen_unseen(pred, y, [classes[c] for c in cand.tolist()], seen)
    return out


def trained_classes(ctx: EvalContext) -> set[str] | None:
    """When the run was trained on a class subset (its training store extracted with an option that restricts the
    classes, e.g. world `-o unseen=...`, fashion-mnist `-o classes=...`; the reader's `seen_classes` says which):
    those classes. None otherwise, or when run.json does not say where that store is, or it is gone."""
    path = ctx.meta.get("image_store")
    if not isinstance(path, str) or not (location(path) / "zarr.json").is_file():
        return None
    try:
        st = open_store(path, modality="image")
        seen = dataset_class(st.layout.dataset).seen_classes(dict((st.layout.origin or {}).get("options") or {}))
    except PipeError:
        return None
    return set(seen) if seen is not None else None


def seen_unseen(pred: torch.Tensor, y: torch.Tensor, names: list[str], seen: set[str]) -> dict[str, Any]:
    """Mean per-class recall over the evaluated classes the run was trained on (seen) and over the others (unseen),
    predictions made among all candidates; only when both groups have images."""
    recall = {names[j]: float((pred[y == j] == j).float().mean()) for j in range(len(names)) if (y == j).any()}
    s = [v for k, v in recall.items() if k in seen]
    u = [v for k, v in recall.items() if k not in seen]
    if not s or not u:
        return {}
    unseen_images = sum(int((y == j).sum()) for j in range(len(names)) if names[j] not in seen)
    return {
        "seen_acc": float(np.mean(s)),
        "unseen_acc": float(np.mean(u)),
        "seen_classes": len(s),
        "unseen_classes": len(u),
        "unseen_images": unseen_images,
        "unseen_names": sorted(k for k in recall if k not in seen),
    }


@register_task("classification")
class ClassificationTask(Task):
    """Zero-shot classification with the class-prompt store: acc1, acc5, balanced accuracy."""

    text = "prompts"
    columns = (("acc1", "acc1"), ("balanced_acc", "bal.acc"), ("seen_acc", "seen"), ("unseen_acc", "unseen"))
    report_rank = 10

    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], None]:
        return run_classification(ctx), None
