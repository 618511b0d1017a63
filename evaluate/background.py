"""How zero-shot segmentation decides "background", and the scan that picks an optional score threshold.

The rule of `pipe eval segmentation` (and the default everywhere): a background prompt ("a photo of a background.",
...) is one more class and competes in the argmax of the upsampled score maps. With few pairs it rarely wins, since no
caption describes the background that way, so object classes spill onto background patches. The optional threshold T
adds one rule after that argmax: a pixel whose best non-background score is below T becomes background. T = None is
the eval's rule exactly (the same `upsample_argmax`). `scan_thresholds` picks T on a split's stores and masks by
foreground mIoU, from the same scores, label space and confusion matrix as the eval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from pipe_align.evaluate.config import EvalConfig
from pipe_align.evaluate.context import load_context
from pipe_align.evaluate.dataset import check_origin, dataset_rows, image_or_none, open_dataset
from pipe_align.evaluate.figures import PALETTE, colorize
from pipe_align.evaluate.loading import row_blocks
from pipe_align.evaluate.metrics import ConfusionMatrix
from pipe_align.evaluate.prompts import class_weights
from pipe_align.evaluate.segmentation import (
    CLASS_CHUNK,
    EXTRACT_OPTIONS,
    check_inputs,
    label_spaces,
    patch_scores,
    upsample_argmax,
)
from pipe_align.extract.errors import PipeError

QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))  # default grid: quantiles of the patches' best fg score


def upsample_max(scores: Tensor, size: tuple[int, int], chunk: int = CLASS_CHUNK) -> Tensor:
    """[C, h, w] -> [H, W] maximum over classes of the bilinearly upsampled score maps (chunked like
    `upsample_argmax`, so it is the value that argmax picks)."""
    best = None
    for c0 in range(0, scores.shape[0], chunk):
        up = F.interpolate(scores[None, c0 : c0 + chunk], size=size, mode="bilinear", align_corners=False)[0]
        v = up.max(dim=0).values
        best = v if best is None else torch.maximum(best, v)
    return best


def decode(scores: Tensor, size: tuple[int, int], background: int | None = None,
           threshold: float | None = None) -> Tensor:  # fmt: skip
    """[C, h, w] class scores -> [H, W] class indices: the eval's argmax (background competing), then, with a
    threshold, background wherever the best non-background score is below it."""
    # Contiguous, as the eval's `scores[j, candidates]` copy is: the rounding of bilinear interpolation depends on the
    # memory layout (channels-last vs not, about 3e-8), which decides exact ties between classes.
    scores = scores.contiguous()
    pred = upsample_argmax(scores, size)
    if threshold is None or background is None or scores.shape[0] < 2:
        return pred
    fg = [c for c in range(scores.shape[0]) if c != background]
    return torch.where(upsample_max(scores[fg], size) < threshold, background, pred)


@dataclass
class ThresholdScan:
    """Foreground mIoU (and mIoU) per threshold on one split; `best` is the first threshold of the highest fg mIoU in
    the order scanned (None = no threshold comes first, so a threshold must improve on the eval's rule to win)."""

    thresholds: list[float | None]
    fg_miou: list[float]
    miou: list[float]
    images: int
    classes: list[str]
    background: int
    examples: list[tuple[int, np.ndarray, list[np.ndarray]]] = field(default_factory=list)  # (item, mask, per T)

    @property
    def best(self) -> float | None:
        return self.thresholds[int(np.nanargmax(self.fg_miou))]

    def to_dict(self) -> dict:
        return {"best": self.best, "images": self.images, "grid": [
            {"threshold": t, "fg_mIoU": f, "mIoU": m} for t, f, m in zip(self.thresholds, self.fg_miou, self.miou)]}


@torch.no_grad()
def scan_thresholds(cfg: EvalConfig, thresholds: Sequence[float | None] | None = None) -> ThresholdScan:
    """Segment the split of `cfg` (dataset, split, features, run: as `pipe eval segmentation`) under each threshold
    (None = no threshold); without a grid: None and the 5%, 10%, ..., 95% quantiles of the best non-background score
    of every patch of the split. Keeps the predictions of the first `cfg.examples` images for figures."""
    cfg = replace(cfg, task="segmentation", protocol="pal")
    ctx = load_context(cfg, "prompts", EXTRACT_OPTIONS)
    img, device = ctx.image, cfg.device
    check_origin(img, cfg)
    dataset = open_dataset(cfg)
    weights, classes = class_weights(ctx)
    check_inputs(ctx, dataset, classes)
    bg = type(dataset).background
    if bg is None or bg >= len(classes):
        raise PipeError(f"dataset {cfg.dataset} has no background class: a background threshold does not apply")
    fg = [c for c in range(len(classes)) if c != bg]
    void, grid, w = dataset.ignore_index, tuple(img.layout.grid), weights.to(device)
    keep = ~img["skipped"][:].astype(bool)
    if not keep.any():
        raise PipeError(f"{img.path}: every image of {cfg.dataset}/{cfg.split} was skipped; nothing to scan")
    ds_rows = dataset_rows(dataset, img["ids"][:], img.path)

    def blocks():
        for start, stop in row_blocks(img):
            if keep[start:stop].any():
                yield start, patch_scores(ctx.aligner, img.rows("patches", start, stop).float().to(device), w, grid)

    if thresholds is None:
        best_fg = torch.cat([s.cpu()[torch.from_numpy(keep[b0 : b0 + len(s)])][:, fg].amax(1).flatten()
                             for b0, s in blocks()])  # fmt: skip
        thresholds = [None, *torch.quantile(best_fg.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()]
    thresholds = list(thresholds)
    cms = [ConfusionMatrix(len(classes), void) for _ in thresholds]
    lut = label_spaces("pal", type(dataset), classes)[0].target_map(void)  # background competes: every class
    examples, n = [], 0
    for start, scores in blocks():
        for j in np.flatnonzero(keep[start : start + len(scores)]):
            item = int(ds_rows[start + int(j)])
            mask = np.asarray(dataset.load_mask(item))
            target = lut[torch.from_numpy(mask.astype(np.int64))]
            if (target < 0).any():
                raise PipeError(f"mask of item {item}: labels outside the {len(classes)} prompt classes")
            size = tuple(mask.shape)
            pred0 = upsample_argmax(scores[j].contiguous(), size)  # see `decode`
            low = upsample_max(scores[j, fg], size)
            preds = [pred0 if t is None else torch.where(low < t, bg, pred0) for t in thresholds]
            for cm, pred in zip(cms, preds):
                cm.update(pred, target)
            if len(examples) < cfg.examples:
                examples.append((item, mask, [p.cpu().numpy().astype(np.uint8) for p in preds]))
            n += 1
    fg_miou = [cm.compute(classes, exclude=(bg,))["mIoU"] for cm in cms]
    miou = [cm.compute(classes)["mIoU"] for cm in cms]
    return ThresholdScan(thresholds, fg_miou, miou, n, classes, bg, examples)


def before_after_figure(path: Path, scan: ThresholdScan, cfg: EvalConfig, title: str) -> Path:
    """Per example image: the image, ground truth, and the prediction under each scanned threshold (VOC palette)."""
    dataset = open_dataset(cfg)
    cols = 2 + len(scan.thresholds)
    fig = Figure(figsize=(2.6 * cols, 2.6 * len(scan.examples) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(scan.examples), cols, squeeze=False)
    names = ["image", "ground truth"] + [
        "background competes" if t is None else f"+ threshold {t:.3f}" for t in scan.thresholds]
    shown: set[int] = set()
    for r, (item, mask, preds) in enumerate(scan.examples):
        panels = [image_or_none(dataset, item), colorize(mask)] + [colorize(p) for p in preds]
        for c, data in enumerate(panels):
            ax = axes[r][c]
            ax.axis("off")
            if data is not None:
                ax.imshow(data, interpolation="nearest")
            if r == 0:
                ax.set_title(names[c], fontsize=9)
        shown |= {int(v) for p in [mask, *preds] for v in np.unique(p)}
    handles = [Patch(color=PALETTE[i], label=scan.classes[i] if i < len(scan.classes) else str(i))
               for i in sorted(shown)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
