"""`run_eval(cfg)`: resolve the inputs of one task, compute it, write RUN/eval/<name>.json and its figures.

The result JSON is flat: identification (task, dataset, split, protocol, method, run), the task's metrics as
fractions, counts, and "config" (the EvalConfig plus the resolved stores, encoders, grid and resize).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipe_align.evaluate import figures
from pipe_align.evaluate.loading import (
    EvalConfig,
    EvalContext,
    dataset_rows,
    figure_path,
    load_context,
    open_dataset,
    result_path,
    write_result,
)
from pipe_align.extract.errors import PipeError

TEXT_KIND = {"classification": "prompts", "retrieval": "captions", "segmentation": "prompts", "diagnostics": "captions"}
PROTOCOL_NOTES = {
    "pal": "PAL protocol: one 224 px pass (squash resize, whole image), patch scores bilinearly upsampled to the "
           "mask, background prompt competes in the argmax; fg_mIoU excludes background from the mean",
    "standard": "standard label spaces (VOC21 with background, VOC20 background ignored as bg_ignored/*, ADE20K "
                "label 0 ignored) on the store's single fixed-size pass; mmseg's sliding window (short side 448, "
                "window 448, stride 224) is NOT run because the store holds one pass per image",
}  # fmt: skip


@dataclass
class EvalOutcome:
    path: Path
    result: dict[str, Any] | None = None  # None when skipped
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.result is None


def run_eval(cfg: EvalConfig, skip_existing: bool = False) -> EvalOutcome:
    path = result_path(cfg)
    if skip_existing and path.is_file():
        return EvalOutcome(path)
    if cfg.task == "segmentation" and cfg.protocol is None:
        raise PipeError("segmentation needs --protocol pal or standard")
    if cfg.task != "segmentation" and cfg.protocol is not None:
        raise PipeError(f"--protocol applies to segmentation only, not {cfg.task}")
    ctx = load_context(cfg, TEXT_KIND.get(cfg.task))
    outcome = EvalOutcome(path)
    if cfg.task == "classification":
        from pipe_align.evaluate.classification import run_classification

        metrics, extras = run_classification(ctx), None
    elif cfg.task == "retrieval":
        from pipe_align.evaluate.retrieval import run_retrieval

        metrics, extras = run_retrieval(ctx)
    elif cfg.task == "segmentation":
        from pipe_align.evaluate.segmentation import run_segmentation

        metrics, extras = run_segmentation(ctx)
    else:
        from pipe_align.evaluate.diagnostics import run_diagnostics

        metrics, extras = run_diagnostics(ctx)
    result: dict[str, Any] = {"task": cfg.task, "dataset": cfg.dataset, "split": cfg.split}
    if cfg.protocol:
        result |= {"protocol": cfg.protocol, "protocol_note": PROTOCOL_NOTES[cfg.protocol]}
    result |= {"method": ctx.method, "run": Path(cfg.run).resolve().name} | metrics
    result["config"] = cfg.to_dict() | ctx.info
    if cfg.figures and extras is not None:
        outcome.figures = _draw(ctx, result, extras, outcome.notes)
    write_result(path, result)
    outcome.result = result
    return outcome


# -- figures ----------------------------------------------------------------------------------------------------------


def _image(dataset, index: int) -> np.ndarray | None:
    try:
        return np.asarray(dataset.load_image(index).convert("RGB"))
    except PipeError:
        return None


def _reader(ctx: EvalContext, notes: list[str]):
    """The dataset reader for figure images; figures are drawn without images when it cannot be opened."""
    try:
        ds = open_dataset(ctx.cfg)
        return ds, dataset_rows(ds, ctx.image["ids"][:], ctx.image.path)
    except PipeError as e:
        notes.append(f"figures drawn without images ({e})")
        return None, None


def _draw(ctx: EvalContext, result: dict[str, Any], extras: dict[str, Any], notes: list[str]) -> list[Path]:
    cfg = ctx.cfg
    label = f"{result['run']} ({result['method']}) on {cfg.dataset}/{cfg.split}"
    out = []
    if cfg.task == "segmentation":
        ds, classes = extras["dataset"], extras["classes"]
        samples = [(_image(ds, i), gt, pred) for _, i, gt, pred in extras["examples"]]
        if samples:
            out.append(figures.seg_overlays(figure_path(cfg, "overlays"), samples, classes,
                                            f"{label}, protocol {cfg.protocol}"))  # fmt: skip
        names = [k[len("iou/"):] for k in result if k.startswith("iou/")]
        out.append(figures.class_iou_bars(figure_path(cfg, "class-iou"), names, [result[f"iou/{n}"] for n in names],
                                          f"per-class IoU, {label}, protocol {cfg.protocol}"))  # fmt: skip
    elif cfg.task == "retrieval":
        ds, rows = _reader(ctx, notes)
        samples = [(_image(ds, int(rows[r])) if ds is not None else None, caps, hits, scores)
                   for r, caps, hits, scores in zip(extras["rows"], extras["captions"], extras["hits"],
                                                    extras["scores"], strict=True)]  # fmt: skip
        if samples:
            out.append(figures.retrieval_examples(figure_path(cfg, "examples"), samples, f"image -> text, {label}"))
    elif cfg.task == "diagnostics":
        out.append(figures.anchor_usage(figure_path(cfg, "anchor-usage"), extras["image_counts"],
                                        extras["text_counts"], f"anchor usage, {label}"))  # fmt: skip
        top = max(1, min(5, result["anchors"]))
        out.append(figures.dice_histogram(figure_path(cfg, "dice"), extras["dice_matched"], extras["dice_mismatched"],
                                          top, f"top-{top} anchor Dice, {label}"))  # fmt: skip
        ds, rows = _reader(ctx, notes)
        samples = [(_image(ds, int(rows[r])) if ds is not None else None, ids, vals, maps)
                   for r, ids, vals, maps in extras["maps"]]  # fmt: skip
        if samples:
            out.append(figures.anchor_maps(figure_path(cfg, "anchor-maps"), samples, f"anchor activations, {label}"))
    return out
