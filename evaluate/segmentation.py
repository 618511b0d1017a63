"""Zero-shot semantic segmentation from stored patch tokens.

Per-patch class scores are `aligner.image_dense(patches) @ classifier.T` (classifier: template-averaged prompt
embeddings, as in classification), reshaped to the patch grid, bilinearly upsampled (align_corners=False) to each
ground-truth mask, argmax over the competing classes, and counted in one confusion matrix over the split (255
ignored). Which classes compete and which labels are ignored is the protocol's "label space":

- background sets (VOC, the world), both protocols: every class incl. background competes (VOC21); `fg_mIoU`
  leaves background out of the mean (the PAL authors' number); the standard protocol adds `bg_ignored/*`
  (VOC20: background pixels ignored, only the foreground classes compete).
- ADE20K-style sets (label 0 = "other"): label 0 ignored, classes 1.. compete (mmseg reduce_zero_label).
- anything else: all classes compete.
Neither protocol runs mmseg's sliding window (short side 448, window 448, stride 224): the store holds one
fixed-size pass per image, so `standard` means the standard label spaces on those same patch scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.evaluate.loading import (
    EvalContext,
    check_origin,
    class_weights,
    dataset_rows,
    extract_command,
    is_background,
    is_zero_ignored,
    open_dataset,
    row_blocks,
)
from pipe_align.evaluate.metrics import ConfusionMatrix
from pipe_align.extract.errors import PipeError

IGNORE = 255
CLASS_CHUNK = 32  # classes upsampled at once (ADE20K: 150 maps of a 512x683 mask would be 210 MB at once)


@dataclass(frozen=True)
class LabelSpace:
    """One way of scoring: which dataset classes compete in the argmax and how targets are mapped."""

    name: str
    prefix: str  # key prefix in the result ("" = the headline numbers)
    candidates: tuple[int, ...]  # dataset class ids, in order; the argmax index is a position in this tuple
    reduce_zero_label: bool  # label 0 ignored, labels shift down by one (then candidates must be 1..C-1)
    foreground: bool  # also report fg_mIoU (class 0 = background left out of the mean)


def label_spaces(protocol: str, dataset: str, classes: list[str]) -> list[LabelSpace]:
    c = len(classes)
    everything, nonzero = tuple(range(c)), tuple(range(1, c))
    if is_background(classes):
        spaces = [LabelSpace("background-competes", "", everything, False, True)]
        if protocol == "standard":
            spaces.append(LabelSpace("background-ignored", "bg_ignored/", nonzero, True, False))
        return spaces
    if is_zero_ignored(dataset, classes):
        return [LabelSpace("zero-ignored", "", nonzero, True, False)]
    return [LabelSpace("all-classes", "", everything, False, False)]


@torch.no_grad()
def patch_scores(aligner, patches: Tensor, weights: Tensor, grid: tuple[int, int]) -> Tensor:
    """[b, P, D] patches -> [b, C, h, w] class score maps."""
    h, w = grid
    b, p, _ = patches.shape
    if p != h * w:
        raise PipeError(f"store has {p} patches per image but its grid is {h}x{w}")
    scores = aligner.image_dense(patches).float() @ weights.T  # [b, P, C]
    return scores.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def upsample_argmax(scores: Tensor, size: tuple[int, int], chunk: int = CLASS_CHUNK) -> Tensor:
    """[C, h, w] -> [H, W] argmax of the bilinearly upsampled score maps. Interpolation acts per channel, so chunks
    of classes with a running maximum give exactly the full argmax (first index on ties, like argmax)."""
    best_v = best_i = None
    for c0 in range(0, scores.shape[0], chunk):
        up = F.interpolate(scores[None, c0 : c0 + chunk], size=size, mode="bilinear", align_corners=False)[0]
        v, i = up.max(dim=0)
        if best_v is None:
            best_v, best_i = v, i + c0
        else:
            better = v > best_v
            best_v, best_i = torch.where(better, v, best_v), torch.where(better, i + c0, best_i)
    return best_i


def check_inputs(ctx: EvalContext, dataset, classes: list[str]) -> None:
    img, cfg = ctx.image, ctx.cfg
    if not dataset.has_masks():
        raise PipeError(f"dataset {cfg.dataset} split {cfg.split} has no segmentation masks (under {cfg.root})")
    if img.layout.resize != "squash":
        raise PipeError(f"{img.path}: images were resized with {img.layout.resize!r}, so the patch grid does not cover "
                        f"the whole image; re-extract with --resize squash: "
                        f"{extract_command(cfg, ctx.meta['image_encoder'])}")
    if not img.layout.grid:
        raise PipeError(f"{img.path}: no patch grid attribute")
    if dataset.classes is not None and list(dataset.classes) != classes:
        raise PipeError(f"{ctx.text.path}: prompt classes differ from dataset {cfg.dataset}'s classes; re-extract it")


@torch.no_grad()
def run_segmentation(ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics, plus a few (row, image index, ground truth, prediction) examples for the figures."""
    cfg, img, aligner = ctx.cfg, ctx.image, ctx.aligner
    protocol = cfg.protocol or "pal"
    check_origin(img, cfg)
    dataset = open_dataset(cfg)
    weights, classes = class_weights(ctx)
    check_inputs(ctx, dataset, classes)
    spaces = label_spaces(protocol, cfg.dataset, classes)
    cms = [ConfusionMatrix(len(sp.candidates), IGNORE, sp.reduce_zero_label) for sp in spaces]
    skipped = img["skipped"][:].astype(bool)
    ids = img["ids"][:]
    ds_rows = dataset_rows(dataset, ids, img.path)
    grid = tuple(img.layout.grid)
    w = weights.to(cfg.device)
    examples: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    n_images = 0
    for start, stop in row_blocks(img):
        if skipped[start:stop].all():
            continue
        scores = patch_scores(aligner, img.rows("patches", start, stop).float().to(cfg.device), w, grid)
        for j in np.flatnonzero(~skipped[start:stop]):
            row = start + int(j)
            mask = np.asarray(dataset.load_mask(int(ds_rows[row])))
            target = torch.from_numpy(mask.astype(np.int64))
            for k, (sp, cm) in enumerate(zip(spaces, cms, strict=True)):
                pred = upsample_argmax(scores[j, list(sp.candidates)], tuple(mask.shape))
                try:
                    cm.update(pred, target)
                except ValueError as e:
                    raise PipeError(f"mask of {ids[row]}: {e} ({len(classes)} classes in the prompt store)") from None
                if k == 0 and len(examples) < cfg.examples:
                    raw = torch.as_tensor(sp.candidates)[pred.cpu()].numpy().astype(np.uint8)
                    examples.append((row, int(ds_rows[row]), mask, raw))
            n_images += 1
    if n_images == 0:
        raise PipeError(f"{img.path}: every image of {cfg.dataset}/{cfg.split} was skipped; nothing to evaluate")
    out: dict[str, Any] = {"images": n_images, "pixels": int(cms[0].matrix.sum()), "label_space": spaces[0].name,
                           "num_classes": len(spaces[0].candidates)}  # fmt: skip
    for sp, cm in zip(spaces, cms, strict=True):
        names = [classes[c] for c in sp.candidates]
        metrics = cm.compute(names)
        head = {k: metrics.pop(k) for k in ("mIoU", "mAcc", "aAcc")}
        if sp.foreground:
            head["fg_mIoU"] = cm.compute(names, exclude=(0,))["mIoU"]
        if sp.prefix:
            head["label_space"] = sp.name
        out |= {sp.prefix + k: v for k, v in (head | metrics).items()}
    return out, {"examples": examples, "classes": classes, "dataset": dataset}
