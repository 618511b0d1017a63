"""Phrase grounding by the pointing game, from the stores: does the maximum of a phrase's heat map over the image
fall inside one of the phrase's ground-truth boxes?

For every (caption, marked phrase) whose entity has a box, a heat map over the image's patches comes from the
method's own word-patch similarity, and is upsampled bilinearly to the image's pixels:
- "tokens" (methods with token-level text, `Aligner.word_patch_scores`; PAL): the mean over the phrase's tokens, in
  their sentence, of each token's similarity to each patch;
- "phrase" (every method): the phrase embedded as its own text (the `.phrases` store), `image_dense(patches) .
  text_global(phrase)`, as segmentation scores a class prompt.
`pointing_acc` is the tokens heat map's where the method has one, else the phrase's; both are reported where both
exist. The chance level beside it is the mean over phrases of the fraction of the image the phrase's boxes cover
(the hit rate of a point drawn uniformly over the image). Per entity type: a phrase counts for each type its entity
carries. The image store must be squashed (`--resize squash`), so that its patch grid covers the whole image.
Definitions and sources: docs/evaluate.md ("Phrase grounding").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.extract.datasets.base import Grounding
from pipe_align.extract.errors import PipeError
from pipe_align.extract.job import PHRASE_SUFFIX
from pipe_align.extract.phrases import read_phrases
from pipe_align.extract.store import FeatureStore, open_store, store_path

from . import figures
from .base import Task, register_task
from .config import figure_path
from .context import EvalContext, extract_command, store_dataset
from .dataset import check_origin, dataset_rows, image_or_none, open_dataset
from .loading import row_blocks, text_rows

MODES = ("tokens", "phrase")


def box_mask(boxes: tuple[tuple[float, float, float, float], ...], height: int, width: int) -> np.ndarray:
    """[H, W] bool: pixels whose centre (x + 0.5, y + 0.5) lies in any box (half-open: x0 <= c < x1)."""
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    out = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        out |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return out


def point_of(heat: Tensor, height: int, width: int) -> tuple[int, int]:
    """(y, x) pixel of the maximum of a [h, w] patch heat map upsampled bilinearly to the image (first on ties)."""
    up = F.interpolate(heat[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    flat = int(torch.argmax(up))
    return flat // width, flat % width


def phrase_store(ctx: EvalContext) -> FeatureStore:
    """The `.phrases` store of the split (every marked phrase as its own text)."""
    cfg, alias = ctx.cfg, ctx.meta["text_encoder"]
    path = store_path(cfg.features, store_dataset(cfg), cfg.split, alias)
    path = path.with_name(path.name.replace(".zarr", f"{PHRASE_SUFFIX}.zarr"))
    if not (path / "zarr.json").exists():
        raise PipeError(f"no phrase store at {path}; create it with: {extract_command(cfg, alias, 'phrases')}")
    return open_store(path, modality="text", encoder=alias)


class _Block:
    """Patch rows read a shard-aligned block at a time (images are visited in row order): one chunk decode per block,
    not one per image."""

    def __init__(self, store: FeatureStore) -> None:
        self.store, self.blocks = store, list(row_blocks(store, tokens=True))
        self.start, self.stop, self.data = 0, 0, None

    def row(self, r: int) -> Tensor:
        if not self.start <= r < self.stop or self.data is None:
            self.start, self.stop = next((a, b) for a, b in self.blocks if a <= r < b)
            self.data = self.store.rows("patches", self.start, self.stop)
        return self.data[r - self.start]


def _heat_tokens(ctx: EvalContext, patches: Tensor, tokens: Tensor, spans: np.ndarray) -> Tensor | None:
    """[S, P] heat maps of one caption's phrases (spans [S, 2] into its tokens [L, D]) from the method's word-patch
    scores, or None (a method without token-level text)."""
    scores = ctx.aligner.word_patch_scores(patches[None], tokens[None])
    if scores is None:
        return None
    return torch.stack([scores[0, a:b].float().mean(0) for a, b in spans]).cpu()


def run_grounding(ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
    img, caps, cfg, aligner = ctx.image, ctx.text, ctx.cfg, ctx.aligner
    if not img.layout.grid:
        raise PipeError(f"{img.path}: holds no patch grid; grounding needs patch tokens")
    if img.layout.resize != "squash":
        hint = extract_command(cfg, ctx.meta["image_encoder"], None, ("--resize", "squash"))
        raise PipeError(
            f"{img.path}: was extracted with --resize {img.layout.resize}; grounding needs the whole image "
            f"in the patch grid (remove the store, then: {hint})"
        )
    table = read_phrases(caps)
    if table is None:
        raise PipeError(
            f"{caps.path}: holds no phrase spans (dataset {cfg.dataset} has no phrase markup, or the store "
            f"was written before phrase spans existed: re-extract it)"
        )
    ds = open_dataset(cfg)
    if not ds.has_boxes():
        raise PipeError(f"dataset {cfg.dataset} has no phrase boxes (flickr30k-entities and world do)")
    check_origin(img, cfg)
    index = dataset_rows(ds, img.read("ids"), img.path)
    phr = phrase_store(ctx)
    phrase_row = {str(i): r for r, i in enumerate(phr.read("ids"))}
    cap_ids, item = caps.read("ids"), caps.read("item").astype(np.int64)
    skipped = img.read("skipped").astype(bool)
    h, w = img.layout.grid
    block = _Block(img)

    hits: dict[str, list[bool]] = {m: [] for m in MODES}
    chance: list[float] = []
    types: list[tuple[str, ...]] = []
    examples: list[dict[str, Any]] = []
    per_image: dict[int, list[bool]] = {}  # image row -> hits of its phrases (primary map), for the falsification test
    order = np.argsort(item[table[:, 0]], kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(item[table[order, 0]])) + 1) if len(order) else []
    for group in groups:
        image_row = int(item[table[group[0], 0]])
        if skipped[image_row]:
            continue
        g: Grounding = ds.load_boxes(int(index[image_row]))
        patches = block.row(image_row).float().to(cfg.device)
        dense = aligner.image_dense(patches[None])[0]  # [P, E]
        by_caption: dict[int, list[int]] = {}
        for j in group:
            if g.entities.get(int(table[j, 3])) and g.entities[int(table[j, 3])].boxes:
                by_caption.setdefault(int(table[j, 0]), []).append(int(j))
        if not by_caption:
            continue
        keys = {row: [f"{cap_ids[row]}/{table[j, 4]}" for j in js] for row, js in by_caption.items()}
        missing = [k for ks in keys.values() for k in ks if k not in phrase_row]
        if missing:
            raise PipeError(f"{phr.path}: has no row {missing[0]!r} (re-extract it with the caption store)")
        c0, c1 = min(by_caption), max(by_caption) + 1  # an image's captions are neighbours: one read each
        tokens = text_rows(caps, c0, c1, True, cfg.device) if aligner.needs_tokens else None
        p_rows = [phrase_row[k] for ks in keys.values() for k in ks]
        p0, p1 = min(p_rows), max(p_rows) + 1
        p_emb = aligner.text_global(text_rows(phr, p0, p1, aligner.needs_tokens, cfg.device)).float()
        for row, js in by_caption.items():
            heat_t = None if tokens is None else _heat_tokens(ctx, patches, tokens.tokens[row - c0], table[js, 1:3])
            emb = p_emb[torch.tensor([phrase_row[k] - p0 for k in keys[row]], device=p_emb.device)]
            heat_p = (dense.float() @ emb.T).T.cpu()  # [S, P]
            for n, j in enumerate(js):
                ent = g.entities[int(table[j, 3])]
                inside = box_mask(ent.boxes, g.height, g.width)
                chance.append(float(inside.mean()))
                types.append(ent.types)
                shown = {}
                for mode, heat in (("tokens", heat_t), ("phrase", heat_p)):
                    if heat is None:
                        continue
                    y, x = point_of(heat[n].reshape(h, w), g.height, g.width)
                    hits[mode].append(bool(inside[y, x]))
                    if mode == ("tokens" if heat_t is not None else "phrase"):
                        per_image.setdefault(image_row, []).append(bool(inside[y, x]))
                    shown[mode] = (heat[n].reshape(h, w).numpy(), (x, y), bool(inside[y, x]))
                if len(examples) < cfg.examples and n == 0:
                    examples.append(
                        {
                            "image_row": image_row,
                            "caption_row": row,
                            "key": keys[row][n],
                            "boxes": ent.boxes,
                            "maps": shown,
                        }
                    )
    if not chance:
        raise PipeError(f"{caps.path}: no phrase with a box to ground in {cfg.dataset}/{cfg.split}")
    out = grounding_metrics(hits, chance, types)
    out["phrases_dropped"] = int(caps.attrs.get("phrases_dropped", 0))
    texts, captions = phr.read("text"), caps.read("text")
    for ex in examples:
        ex["phrase"], ex["caption"] = str(texts[phrase_row[ex["key"]]]), str(captions[ex["caption_row"]])
    return out, {"examples": examples, "per_image": per_image}


def grounding_metrics(hits: dict[str, list[bool]], chance: list[float], types: list[tuple[str, ...]]) -> dict[str, Any]:
    """Flat metrics: pointing_acc (tokens where the method has them, else phrase), each mode's, per entity type, the
    chance level overall and per type, and counts."""
    primary = "tokens" if hits["tokens"] else "phrase"
    out: dict[str, Any] = {
        "pointing_acc": float(np.mean(hits[primary])),
        "pointing_mode": primary,
        "chance": float(np.mean(chance)),
        "phrases": len(chance),
    }
    for mode in MODES:
        if hits[mode]:
            out[f"pointing_acc/{mode}"] = float(np.mean(hits[mode]))
    for kind in sorted({t for ts in types for t in ts}):
        sel = [i for i, ts in enumerate(types) if kind in ts]
        out[f"pointing_acc/type/{kind}"] = float(np.mean([hits[primary][i] for i in sel]))
        out[f"chance/type/{kind}"] = float(np.mean([chance[i] for i in sel]))
        out[f"phrases/type/{kind}"] = len(sel)
    return out


@register_task("grounding")
class GroundingTask(Task):
    """Phrase grounding (pointing game) with the caption store's phrase spans and the dataset's boxes."""

    text = "captions"
    extract_options = ("--resize", "squash")
    columns = (("pointing_acc", "point"), ("chance", "chance"))
    report_tag = "grnd"
    report_rank = 40

    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return run_grounding(ctx)

    def figures(self, ctx: EvalContext, result: dict[str, Any], extras: dict[str, Any], notes: list[str]) -> list[Path]:
        """`heatmaps`: per example phrase, the image with its boxes and each heat map with its maximum."""
        if not extras["examples"]:
            return []
        try:
            ds = open_dataset(ctx.cfg)
            index = dataset_rows(ds, ctx.image.read("ids"), ctx.image.path)
            images = [image_or_none(ds, int(index[e["image_row"]])) for e in extras["examples"]]
        except PipeError as e:
            notes.append(f"figures drawn without images ({e})")
            images = [None] * len(extras["examples"])
        title = f"pointing game, {self.figure_title(ctx, result)}"
        return [figures.grounding_maps(figure_path(ctx.cfg, "heatmaps"), extras["examples"], images, title)]
