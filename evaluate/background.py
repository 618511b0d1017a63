"""How zero-shot segmentation decides "background", and the scan that picks a background rule's value on a split.

The rule of `pipe eval segmentation` (and the default everywhere): a background prompt ("a photo of a background.",
...) is one more class and competes in the argmax of the upsampled score maps. With few pairs it rarely wins, since no
caption describes the background that way, so object classes spill onto background patches. Two optional rules act
after that argmax, on the same upsampled maps:
- `threshold` T: a pixel whose best non-background score is below T becomes background (an absolute score level);
- `bias` B: a pixel whose best non-background score is below the background's score + B becomes background (the
  background prompt's score raised by B; a margin, so it follows each pixel's own score level).
Neither set is the eval's rule exactly (the same `upsample_argmax`). `scan` picks a rule's value on a split's stores
and masks by foreground mIoU, from the same scores, label space and confusion matrix as the eval.
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

from pipe_align.extract.errors import PipeError

from .config import EvalConfig
from .context import load_context
from .dataset import check_origin, dataset_rows, image_or_none, open_dataset
from .figures import PALETTE, colorize, save_figure
from .loading import row_blocks
from .metrics import ConfusionMatrix
from .prompts import class_weights
from .segmentation import (
    CLASS_CHUNK,
    EXTRACT_OPTIONS,
    check_inputs,
    label_spaces,
    patch_scores,
    upsample_argmax,
)

RULES = ("threshold", "bias")
QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))  # default grid: quantiles of the rule's patch statistic


def upsample(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, h, w] -> [C, H, W] bilinear (align_corners=False), as the eval upsamples."""
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def upsample_max(scores: Tensor, size: tuple[int, int], chunk: int = CLASS_CHUNK) -> Tensor:
    """[C, h, w] -> [H, W] maximum over classes of the upsampled score maps (chunked like `upsample_argmax`, so it is
    the value that argmax picks)."""
    best = None
    for c0 in range(0, scores.shape[0], chunk):
        v = upsample(scores[c0 : c0 + chunk], size).max(dim=0).values
        best = v if best is None else torch.maximum(best, v)
    return best


@dataclass(frozen=True)
class Maps:
    """What every rule decides from, at the image's size: the eval's prediction, the best non-background score and
    the background's score."""

    pred: Tensor
    best_fg: Tensor | None = None
    bg: Tensor | None = None


def maps(scores: Tensor, size: tuple[int, int], background: int | None, need: bool = True) -> Maps:
    # Contiguous, as the eval's `scores[j, candidates]` copy is: the rounding of bilinear interpolation depends on the
    # memory layout (channels-last vs not, about 3e-8), which decides exact ties between classes.
    scores = scores.contiguous()
    pred = upsample_argmax(scores, size)
    if not need or background is None or scores.shape[0] < 2:
        return Maps(pred)
    fg = [c for c in range(scores.shape[0]) if c != background]
    return Maps(pred, upsample_max(scores[fg], size), upsample(scores[background : background + 1], size)[0])


def apply_rule(m: Maps, background: int | None, threshold: float | None = None, bias: float | None = None) -> Tensor:
    """The prediction under the optional rules (both may be given); none given, or no background: the eval's."""
    pred = m.pred
    if background is None or m.best_fg is None:
        return pred
    if bias:
        pred = torch.where(m.best_fg < m.bg + bias, background, pred)
    if threshold is not None:
        pred = torch.where(m.best_fg < threshold, background, pred)
    return pred


def decode(
    scores: Tensor,
    size: tuple[int, int],
    background: int | None = None,
    threshold: float | None = None,
    bias: float | None = None,
) -> Tensor:
    """[C, h, w] class scores -> [H, W] class indices: the eval's argmax (background competing), then the rules."""
    need = threshold is not None or bool(bias)
    return apply_rule(maps(scores, size, background, need), background, threshold, bias)


@dataclass
class BackgroundScan:
    """Foreground mIoU (and mIoU) per value of one rule on one split; None = rule off (the eval's rule). `best` is
    the first value of the highest fg mIoU in the order scanned, None first, so a value must beat the eval's rule."""

    rule: str
    values: list[float | None]
    fg_miou: list[float]
    miou: list[float]
    bg_errors: list[float]  # share of the wrongly labelled pixels that are background pixels given an object class
    images: int
    classes: list[str]
    background: int
    examples: list[tuple[int, np.ndarray, list[np.ndarray]]] = field(default_factory=list)  # (item, mask, per value)

    @property
    def best(self) -> float | None:
        return self.values[int(np.nanargmax(self.fg_miou))]

    def to_dict(self) -> dict:
        rows = zip(self.values, self.fg_miou, self.miou, self.bg_errors)
        return {
            "rule": self.rule,
            "best": self.best,
            "images": self.images,
            "grid": [{self.rule: v, "fg_mIoU": f, "mIoU": m, "errors_on_background": e} for v, f, m, e in rows],
        }


@torch.no_grad()
def scan(cfg: EvalConfig, rule: str = "bias", values: Sequence[float | None] | None = None) -> BackgroundScan:
    """Segment the split of `cfg` (dataset, split, features, run: as `pipe eval segmentation`) under each value of
    `rule` (None = off). Without values: None and the 5%, 10%, ..., 95% quantiles of the rule's statistic over the
    split's patches (threshold: the best non-background score; bias: its margin over the background's score, among
    patches where it is positive), so that each step turns about 5% more patches into background. Keeps the
    predictions of the first `cfg.examples` images for figures."""
    if rule not in RULES:
        raise PipeError(f"background rule must be one of {', '.join(RULES)}, got {rule!r}")
    cfg = replace(cfg, task="segmentation", protocol="pal")
    ctx = load_context(cfg, "prompts", EXTRACT_OPTIONS)
    img, device = ctx.image, cfg.device
    check_origin(img, cfg)
    dataset = open_dataset(cfg)
    weights, classes = class_weights(ctx)
    check_inputs(ctx, dataset, classes)
    bg = type(dataset).background
    if bg is None or bg >= len(classes):
        raise PipeError(f"dataset {cfg.dataset} has no background class: a background rule does not apply")
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

    if values is None:
        stats = []
        for b0, s in blocks():
            s = s.cpu()[torch.from_numpy(keep[b0 : b0 + len(s)])]
            best = s[:, fg].amax(1).flatten()
            stats.append(best if rule == "threshold" else (best - s[:, bg].flatten()).clamp(min=0))
        stat = torch.cat(stats).double()
        stat = stat[stat > 0] if rule == "bias" and (stat > 0).any() else stat
        values = [None, *torch.quantile(stat, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()]
    values = list(values)
    cms = [ConfusionMatrix(len(classes), void) for _ in values]
    lut = label_spaces("pal", type(dataset), classes)[0].target_map(void)  # background competes: every class
    examples, n = [], 0
    for start, scores in blocks():
        for j in np.flatnonzero(keep[start : start + len(scores)]):
            item = int(ds_rows[start + int(j)])
            mask = np.asarray(dataset.load_mask(item))
            target = lut[torch.from_numpy(mask.astype(np.int64))]
            if (target < 0).any():
                raise PipeError(f"mask of item {item}: labels outside the {len(classes)} prompt classes")
            m = maps(scores[j], tuple(mask.shape), bg)
            preds = [apply_rule(m, bg, **{rule: v}) for v in values]
            for cm, pred in zip(cms, preds):
                cm.update(pred, target)
            if len(examples) < cfg.examples:
                examples.append((item, mask, [p.cpu().numpy().astype(np.uint8) for p in preds]))
            n += 1
    fg_miou = [cm.compute(classes, exclude=(bg,))["mIoU"] for cm in cms]
    miou = [cm.compute(classes)["mIoU"] for cm in cms]
    wrong = [(cm.matrix.sum() - cm.matrix.diagonal().sum()).item() for cm in cms]
    bg_errors = [(cm.matrix[bg].sum() - cm.matrix[bg, bg]).item() / max(w, 1) for cm, w in zip(cms, wrong)]
    return BackgroundScan(rule, values, fg_miou, miou, bg_errors, n, classes, bg, examples)


def before_after_figure(
    path: Path,
    cfg: EvalConfig,
    classes: Sequence[str],
    columns: Sequence[str],
    examples: Sequence[tuple[int, np.ndarray, Sequence[np.ndarray]]],
    title: str,
) -> Path:
    """Per example image (item, mask, one prediction per column): the image, ground truth and the predictions under
    the named rules, in the VOC palette."""
    dataset = open_dataset(cfg)
    cols = 2 + len(columns)
    fig = Figure(figsize=(2.6 * cols, 2.6 * len(examples) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(examples), cols, squeeze=False)
    names = ["image", "ground truth", *columns]
    shown: set[int] = set()
    for r, (item, mask, preds) in enumerate(examples):
        panels = [image_or_none(dataset, item), colorize(mask)] + [colorize(p) for p in preds]
        for c, data in enumerate(panels):
            ax = axes[r][c]
            ax.axis("off")
            if data is not None:
                ax.imshow(data, interpolation="nearest")
            if r == 0:
                ax.set_title(names[c], fontsize=9)
        shown |= {int(v) for p in [mask, *preds] for v in np.unique(p)}
    handles = [Patch(color=PALETTE[i], label=classes[i] if i < len(classes) else str(i)) for i in sorted(shown)]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
