"""Zero-shot semantic segmentation from stored patch tokens.

Per-patch class scores are `aligner.image_dense(patches) @ classifier.T` (classifier: template-averaged prompt
embeddings, as in classification), reshaped to the patch grid, bilinearly upsampled (align_corners=False) to each
ground-truth mask, argmax over the competing classes, and counted in one confusion matrix over the split (the
reader's void value ignored). Which classes compete and which labels are ignored is the protocol's "label space",
built from the dataset reader's label-space facts (`background`, `reduce_zero_label`, `ignore_index`):

- a background class (VOC, the world), both protocols: every class incl. background competes (VOC21); `fg_mIoU`
  leaves background out of the mean (the PAL authors' number); the standard protocol adds `bg_ignored/*`
  (VOC20: background pixels ignored, only the other classes compete).
- `reduce_zero_label` (ADE20K): label 0 is never a target. `standard`: classes 1.. compete (mmseg's convention,
  150-way). `pal`: the PAL authors' rule (`src/evaluation/zero_shot_segmentation.py`, `DatasetSpec.for_ade20k` and
  `run_eval`): all 151 classes compete, class 0's prompt included, and a pixel predicted as class 0 counts as a
  wrong prediction; class 0 enters the mean with IoU 0 as soon as it is predicted anywhere (their mIoU-fg equals
  their mIoU there, so no `fg_mIoU` is reported).
- anything else: all classes compete.
Neither protocol runs mmseg's sliding window (short side 448, window 448, stride 224): the store holds one
fixed-size pass per image, so `standard` means the standard label spaces on those same patch scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.extract.datasets import Dataset
from pipe_align.extract.errors import PipeError

from . import figures
from .base import Task, register_task
from .config import figure_path
from .context import EvalContext, extract_command
from .dataset import check_origin, dataset_rows, image_or_none, open_dataset
from .loading import row_blocks
from .metrics import ConfusionMatrix
from .prompts import class_weights

CLASS_CHUNK = 32  # classes upsampled at once (ADE20K: 150 maps of a 512x683 mask would be 210 MB at once)
PROTOCOLS = {
    "pal": "PAL protocol: one 224 px pass (squash resize, whole image), patch scores bilinearly upsampled to the "
    "mask, background prompt competes in the argmax; fg_mIoU excludes background from the mean; ADE20K: "
    "151-way, label 0 never a target but its prompt competes (the authors' rule)",
    "standard": "standard label spaces (VOC21 with background, VOC20 background ignored as bg_ignored/*, ADE20K "
    "label 0 ignored) on the store's single fixed-size pass; mmseg's sliding window (short side 448, "
    "window 448, stride 224) is NOT run because the store holds one pass per image",
}
EXTRACT_OPTIONS = ("--resize", "squash")


@dataclass(frozen=True)
class LabelSpace:
    """One way of scoring: which dataset classes compete in the argmax and which mask labels are ignored."""

    name: str
    prefix: str  # key prefix in the result ("" = the headline numbers)
    candidates: tuple[int, ...]  # dataset class ids, in order; the argmax index is a position in this tuple
    ignored: tuple[int, ...] = ()  # mask labels not counted besides the void value
    background: int | None = None  # position left out of fg_mIoU (also reported when set)

    def target_map(self, void: int) -> Tensor:
        """Lookup table mask label (uint8) -> position in `candidates`, or `void` for ignored labels; -1 marks labels
        of no class (an error: the mask and the prompt store disagree)."""
        lut = torch.full((max(256, void + 1),), -1, dtype=torch.long)
        lut[list(self.candidates)] = torch.arange(len(self.candidates))
        lut[[*self.ignored, void]] = void
        return lut


def label_spaces(protocol: str, reader: type[Dataset], classes: list[str]) -> list[LabelSpace]:
    c = len(classes)
    everything = tuple(range(c))
    bg = reader.background
    if bg is not None and bg < c:
        spaces = [LabelSpace("background-competes", "", everything, background=bg)]
        if protocol == "standard":
            others = tuple(i for i in everything if i != bg)
            spaces.append(LabelSpace("background-ignored", "bg_ignored/", others, ignored=(bg,)))
        return spaces
    if reader.reduce_zero_label:
        if protocol == "pal":
            return [LabelSpace("zero-competes", "", everything, ignored=(0,))]
        return [LabelSpace("zero-ignored", "", everything[1:], ignored=(0,))]
    return [LabelSpace("all-classes", "", everything)]


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
    of classes with a running maximum give exactly the full argmax (first index on ties, like argmax). The input is
    made contiguous first: bilinear rounding depends on the memory layout (about 3e-8), enough to flip exact ties."""
    scores = scores.contiguous()
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


def count_image(space: LabelSpace, lut: Tensor, cm: ConfusionMatrix, scores: Tensor, raw: Tensor) -> Tensor:
    """Count one image into `cm`: [C, h, w] score maps of every prompt-store class and the raw [H, W] mask; the
    space's candidates compete, the mask is mapped through `lut` (`space.target_map`). Returns the prediction
    (positions in `space.candidates`)."""
    target = lut[raw]
    if (target < 0).any():
        bad = sorted({int(v) for v in raw[target < 0].unique()[:5]})
        raise PipeError(f"labels {bad} are no class of the {scores.shape[0]} in the prompt store")
    pred = upsample_argmax(scores[list(space.candidates)], tuple(raw.shape))
    cm.update(pred, target)
    return pred


def check_inputs(ctx: EvalContext, dataset: Dataset, classes: list[str]) -> None:
    img, cfg = ctx.image, ctx.cfg
    if not dataset.has_masks():
        raise PipeError(f"dataset {cfg.dataset} split {cfg.split} has no segmentation masks (under {cfg.root})")
    if img.layout.resize != "squash":
        raise PipeError(
            f"{img.path}: images were resized with {img.layout.resize!r}, so the patch grid does not cover "
            f"the whole image; re-extract with --resize squash: "
            f"{extract_command(cfg, ctx.meta['image_encoder'], None, EXTRACT_OPTIONS)}"
        )
    if not img.layout.grid:
        raise PipeError(f"{img.path}: no patch grid attribute")
    if dataset.classes is not None and list(dataset.classes) != classes:
        raise PipeError(f"{ctx.text.path}: prompt classes differ from dataset {cfg.dataset}'s classes; re-extract it")


@torch.no_grad()
def run_segmentation(ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics, plus a few (row, image index, ground truth, prediction) examples for the figures."""
    cfg, img, aligner = ctx.cfg, ctx.image, ctx.aligner
    protocol = cfg.protocol or next(iter(PROTOCOLS))
    check_origin(img, cfg)
    dataset = open_dataset(cfg)
    weights, classes = class_weights(ctx)
    check_inputs(ctx, dataset, classes)
    void = dataset.ignore_index
    spaces = label_spaces(protocol, type(dataset), classes)
    cms = [ConfusionMatrix(len(sp.candidates), void) for sp in spaces]
    luts = [sp.target_map(void) for sp in spaces]
    skipped = img.read("skipped").astype(bool)
    ids = img.read("ids")
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
            raw = torch.from_numpy(mask.astype(np.int64))
            for k, (sp, cm, lut) in enumerate(zip(spaces, cms, luts, strict=True)):
                try:
                    pred = count_image(sp, lut, cm, scores[j], raw)
                except PipeError as e:
                    raise PipeError(f"mask of {ids[row]}: {e} and not void ({void})") from None
                if k == 0 and len(examples) < cfg.examples:
                    shown = torch.as_tensor(sp.candidates)[pred.cpu()].numpy().astype(np.uint8)
                    examples.append((row, int(ds_rows[row]), mask, shown))
            n_images += 1
    if n_images == 0:
        raise PipeError(f"{img.path}: every image of {cfg.dataset}/{cfg.split} was skipped; nothing to evaluate")
    out: dict[str, Any] = {
        "images": n_images,
        "pixels": int(cms[0].matrix.sum()),
        "label_space": spaces[0].name,
        "num_classes": len(spaces[0].candidates),
    }
    for sp, cm in zip(spaces, cms, strict=True):
        names = [classes[c] for c in sp.candidates]
        metrics = cm.compute(names)
        head = {k: metrics.pop(k) for k in ("mIoU", "mAcc", "aAcc")}
        if sp.background is not None:
            head["fg_mIoU"] = cm.compute(names, exclude=(sp.background,))["mIoU"]
        if sp.prefix:
            head["label_space"] = sp.name
        out |= {sp.prefix + k: v for k, v in (head | metrics).items()}
    return out, {"examples": examples, "classes": classes, "dataset": dataset}


@register_task("segmentation")
class SegmentationTask(Task):
    """Zero-shot segmentation from patch tokens and class prompts: mIoU, fg mIoU, per-class IoU, aAcc."""

    text = "prompts"
    protocols = PROTOCOLS
    extract_options = EXTRACT_OPTIONS
    columns = (("mIoU", "mIoU"), ("fg_mIoU", "fg mIoU"), ("bg_ignored/mIoU", "mIoU bg ignored"))
    report_tag = "seg"
    report_rank = 30

    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return run_segmentation(ctx)

    def figures(self, ctx: EvalContext, result: dict[str, Any], extras: dict[str, Any], notes: list[str]) -> list[Path]:
        """`overlays` (image, ground truth, prediction) and `class-iou` (per-class IoU bars)."""
        cfg, ds = ctx.cfg, extras["dataset"]
        title = f"{self.figure_title(ctx, result)}, protocol {cfg.protocol}"
        out = []
        samples = [(image_or_none(ds, i), gt, pred) for _, i, gt, pred in extras["examples"]]
        if samples:
            out.append(
                figures.seg_overlays(
                    figure_path(cfg, "overlays"), samples, extras["classes"], title, void=ds.ignore_index
                )
            )
        names = [k[len("iou/") :] for k in result if k.startswith("iou/")]
        out.append(
            figures.class_iou_bars(
                figure_path(cfg, "class-iou"), names, [result[f"iou/{n}"] for n in names], f"per-class IoU, {title}"
            )
        )
        return out
