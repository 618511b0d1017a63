"""Evaluation metrics as pure functions that return flat ``{name: float}`` dicts.

The definitions are the field's, so that numbers from this tool can sit beside published ones:

- classification and retrieval follow clip_benchmark (LAION-AI/CLIP_benchmark,
  ``clip_benchmark/metrics/zeroshot_classification.py`` and ``zeroshot_retrieval.py``);
- segmentation follows mmsegmentation's ``IoUMetric`` (``mmseg/evaluation/metrics/iou_metric.py``): one confusion
  matrix accumulated over all images, per-class IoU, classes that never occur (union 0) left out of the mean.

Every value is a fraction in [0, 1] (clip_benchmark reports fractions; mmseg multiplies by 100, we do not), NaN
where a quantity is undefined (a class absent from both prediction and ground truth). See ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.align.retrieval import as_float, as_long, blocked_topk, blocked_topk_both, retrieval_metrics

__all__ = [
    "ConfusionMatrix",
    "blocked_topk",
    "blocked_topk_both",
    "classification_metrics",
    "miou_reference",
    "retrieval_metrics",
    "zero_shot_classifier",
]


# ----------------------------------------------------------------------------------------------------- classification


def zero_shot_classifier(prompt_emb: Tensor, prompt_class: Tensor, num_classes: int) -> Tensor:
    """Class weights [C, E] from prompt embeddings, as clip_benchmark/OpenCLIP build them.

    Each prompt embedding is L2-normalised first (so a template with a large norm cannot dominate its class), the
    normalised embeddings of a class are averaged over its templates, and the mean is L2-normalised again so that
    every class competes on cosine similarity.

    Args:
        prompt_emb: [P, E] one embedding per (class, template) row of a class-prompt store.
        prompt_class: [P] class index of each row (the store's ``item`` array).
        num_classes: C; every class must have at least one prompt.
    """
    if prompt_emb.ndim != 2 or prompt_class.ndim != 1 or prompt_emb.shape[0] != prompt_class.shape[0]:
        raise ValueError(
            f"expected prompt_emb [P, E] and prompt_class [P], got {tuple(prompt_emb.shape)} and "
            f"{tuple(prompt_class.shape)}"
        )
    cls = as_long(prompt_class, "prompt_class").to(prompt_emb.device)
    if cls.numel() and (cls.min() < 0 or cls.max() >= num_classes):
        raise ValueError(f"prompt_class values must lie in [0, {num_classes})")
    counts = torch.bincount(cls, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes without any prompt: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    emb = F.normalize(as_float(prompt_emb), dim=-1)
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, cls, emb)
    means = sums / counts.unsqueeze(1).to(emb.dtype)
    return F.normalize(means, dim=-1)


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1, top-5 and balanced accuracy, exactly as clip_benchmark's zero-shot classification reports them.

    - ``acc1`` / ``acc5``: fraction of samples whose label is among the ``torch.topk`` indices of its logits (ties
      broken however ``torch.topk`` breaks them). ``acc5`` only when there are at least 5 classes (clip_benchmark
      reports NaN or None there; we omit the key: with fewer classes top-5 is trivially 1).
    - ``balanced_acc``: mean over the classes present in ``labels`` of the per-class recall of the argmax prediction
      (sklearn ``balanced_accuracy_score``, clip_benchmark's ``mean_per_class_recall``). Classes that are only
      predicted, never true, have no recall and do not enter the mean.

    Args:
        logits: [N, C] scores (any monotone scale: cosine, logit-scaled cosine, probabilities).
        labels: [N] class indices in [0, C).
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n, c = logits.shape
    if n == 0:
        raise ValueError("no samples")
    y = as_long(labels, "labels").to(logits.device)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c})")
    out: dict[str, float] = {}
    kmax = 5 if c >= 5 else 1
    top = torch.topk(logits, kmax, dim=1, largest=True, sorted=True).indices  # [N, kmax]
    correct = top == y.unsqueeze(1)
    out["acc1"] = correct[:, :1].any(dim=1).double().mean().item()
    if c >= 5:
        out["acc5"] = correct[:, :5].any(dim=1).double().mean().item()
    pred = logits.argmax(dim=1)  # clip_benchmark takes argmax here, topk above; they agree except on exact ties
    support = torch.bincount(y, minlength=c)
    hits = torch.bincount(y[pred == y], minlength=c)
    present = support > 0
    out["balanced_acc"] = (hits[present].double() / support[present].double()).mean().item()
    return out


# ------------------------------------------------------------------------------------------------------- segmentation


def _mean_excluding_nan(values: np.ndarray) -> float:
    """nanmean without numpy's empty-slice warning: NaN when nothing is defined."""
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def _seg_summary(
    inter: np.ndarray,
    area_label: np.ndarray,
    area_pred: np.ndarray,
    names: Sequence[str],
    exclude: Sequence[int] = (),
) -> dict[str, float]:
    """mmseg ``total_area_to_metrics`` on per-class pixel counts (float64), as fractions."""
    union = area_label + area_pred - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(area_label > 0, inter / area_label, np.nan)
    keep = np.ones(len(names), dtype=bool)
    keep[list(exclude)] = False
    total = area_label.sum()
    out = {
        "mIoU": _mean_excluding_nan(iou[keep]),
        "mAcc": _mean_excluding_nan(acc[keep]),
        "aAcc": float(inter.sum() / total) if total > 0 else float("nan"),
    }
    out.update({f"iou/{name}": float(v) for name, v in zip(names, iou, strict=True)})
    out.update({f"acc/{name}": float(v) for name, v in zip(names, acc, strict=True)})
    return out


class ConfusionMatrix:
    """Semantic-segmentation confusion matrix accumulated over images (mmseg ``IoUMetric`` semantics).

    ``matrix[t, p]`` counts valid pixels of true class ``t`` predicted as ``p``; the extra last column counts
    predictions outside [0, C), which are therefore wrong for their true class and belong to no class's
    prediction area (mmseg's histogram drops them the same way). Pixels whose target is ``ignore_index`` are
    skipped entirely, whatever was predicted there. Counting one matrix over the whole set (not per-image IoU
    averaged) is what mmseg and every published mIoU does.

    ``reduce_zero_label`` applies mmseg's ADE20K convention to targets before counting: label 0 ("other") becomes
    ``ignore_index`` and every other label shifts down by one, so ADE20K's 150 classes are 0..149. The same switch
    gives the "VOC20, background ignored" protocol (targets 0 = background ignored, classes 1..20 -> 0..19).
    Predictions are never shifted: they must already be in the reduced class space.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.matrix = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.long)

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.matrix.zero_()

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (e.g. from another worker or shard); settings must match."""
        if (other.num_classes, other.ignore_index, other.reduce_zero_label) != (
            self.num_classes,
            self.ignore_index,
            self.reduce_zero_label,
        ):
            raise ValueError("cannot merge confusion matrices with different settings")
        self.matrix += other.matrix

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Count one [H, W] map or a batch [N, H, W] of maps (same shape); counting runs on ``pred``'s device.

        Raises ValueError when a non-ignored target (after ``reduce_zero_label``) lies outside [0, C): that is a
        class-count or label-mapping bug, and silently dropping those pixels (as mmseg's histogram would) hides it.
        """
        p = as_long(pred, "pred")
        t = as_long(target, "target").to(p.device)
        if p.shape != t.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
        p, t = p.reshape(-1), t.reshape(-1)
        c = self.num_classes
        valid = t != self.ignore_index
        if self.reduce_zero_label:
            valid &= t != 0
            t = t - 1
        p, t = p[valid], t[valid]
        if t.numel() == 0:
            return
        if t.min() < 0 or t.max() >= c:
            bad = t[(t < 0) | (t >= c)][:5].tolist()
            shift = " after reduce_zero_label" if self.reduce_zero_label else ""
            raise ValueError(f"target labels{shift} outside [0, {c}) and not ignore_index={self.ignore_index}: {bad}")
        p = torch.where((p >= 0) & (p < c), p, torch.full_like(p, c))
        counts = torch.bincount(t * (c + 1) + p, minlength=c * (c + 1))
        self.matrix += counts.reshape(c, c + 1).cpu()

    def compute(self, class_names: Sequence[str] | None = None, exclude: Sequence[int] = ()) -> dict[str, float]:
        """Metrics from the counts so far, all fractions in [0, 1] (mmseg prints percent; multiply by 100).

        Keys: ``mIoU``, ``mAcc``, ``aAcc``, ``iou/<name>`` and ``acc/<name>`` per class (name = index when no names).

        - IoU_c = TP / (TP + FP + FN); NaN when the class is in neither prediction nor target (union 0).
        - Acc_c = TP / (pixels of class c); NaN when the class never occurs in the target.
        - ``mIoU`` / ``mAcc``: mean over classes with a defined value (mmseg ``nanmean``): a class only ever predicted
          counts as IoU 0, a class never seen at all is left out. ``exclude`` also leaves classes out of these two
          means (e.g. ``exclude=(0,)`` for PAL's foreground mIoU from a 21-class VOC matrix); their per-class values
          are still reported.
        - ``aAcc``: correctly classified valid pixels / valid pixels, over all classes (``exclude`` does not apply).
        """
        c = self.num_classes
        names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
        if len(names) != c:
            raise ValueError(f"{len(names)} class names for {c} classes")
        bad = [e for e in exclude if not 0 <= e < c]
        if bad:
            raise ValueError(f"exclude indices outside [0, {c}): {bad}")
        mat = self.matrix.double().numpy()
        inter = np.diag(mat[:, :c]).copy()
        return _seg_summary(inter, mat.sum(axis=1), mat[:, :c].sum(axis=0), names, exclude)


def miou_reference(
    preds: Sequence[Tensor | np.ndarray],
    targets: Sequence[Tensor | np.ndarray],
    num_classes: int,
    ignore_index: int = 255,
) -> dict[str, float]:
    """Slow, obviously-correct segmentation metrics by per-class set counting; for tests of ``ConfusionMatrix``.

    For every class and every image it counts, with boolean masks over the non-ignored pixels, the intersection
    {pred = c and target = c} and the union {pred = c or target = c}, and sums them over images. Same keys as
    ``ConfusionMatrix.compute`` (class names are the indices). No ``reduce_zero_label``: map targets beforehand.
    """
    if len(preds) != len(targets):
        raise ValueError("preds and targets differ in length")
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    correct = 0
    total = 0
    for p_, t_ in zip(preds, targets, strict=True):
        p = np.asarray(p_.cpu() if isinstance(p_, Tensor) else p_).astype(np.int64)
        t = np.asarray(t_.cpu() if isinstance(t_, Tensor) else t_).astype(np.int64)
        valid = t != ignore_index
        correct += int(np.sum((p == t) & valid))
        total += int(np.sum(valid))
        for c in range(num_classes):
            pc = (p == c) & valid
            tc = (t == c) & valid
            inter[c] += np.sum(pc & tc)
            union[c] += np.sum(pc | tc)
            area_label[c] += np.sum(tc)
    # union = label + pred - inter, so pred area = union - label + inter
    out = _seg_summary(inter, area_label, union - area_label + inter, [str(i) for i in range(num_classes)])
    out["aAcc"] = correct / total if total else float("nan")  # counted directly, not through the diagonal
    return out
