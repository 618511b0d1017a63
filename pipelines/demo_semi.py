"""The demo's semi-supervised part: SOTAlign's own setting, a few pairs plus many unpaired images and captions.

From the demo's world train stores: the first `pairs` images with their captions are the only pairs (`RunConfig.limit`,
no held-out rows: every method trains on all of them for a fixed budget and keeps its last epoch); the remaining
train images and the captions of those images become two unpaired stores (`--unpaired-shards`), each in its own
seeded shuffle, so nothing links an unpaired image to an unpaired caption by position (SOTAlign never uses their
pairing anyway; the partners of the unpaired images are in the caption pool, as when both come from one dataset).
Compared on world val (retrieval, classification, segmentation `pal` protocol): the linear teacher alone
(procrustes on the pairs), SOTAlign on the pairs + unpaired stores, SOTAlign with its unpaired rows taken from the
pairs themselves (what it does without `--unpaired-shards`), and PAL on the same pairs. Results in `OUT/semi.md` and
`OUT/semi.json` (rewritten only when they change, so a re-run leaves every file as it was).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import typer

from pipe_align.align.loop import RunConfig
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.extract.store import FeatureStore, create_store, default_rows, expected_shapes, open_store

SEED = 0
# per demo size: pairs, PAL epochs (full batch), SOTAlign epochs and batch (unpaired rows per step)
BUDGETS = {
    "small": {"pairs": 12, "pal_epochs": 2, "sot_epochs": 2, "sot_batch": 16},
    "full": {"pairs": 40, "pal_epochs": 400, "sot_epochs": 100, "sot_batch": 128},
}
PAL_PARAMS = {"anchors": 128, "lr": 1e-2}  # the small-data setting (K 128, lr 1e-2, full batch)


def run_semi(stages: Any, out: Path, size: str, n_val: int) -> Path:
    """Build the unpaired stores, train the four runs, evaluate them on world val, write semi.md / semi.json.
    `stages` is the demo's `Stages` (its features folder, progress setting and `eval`)."""
    budget = BUDGETS[size]
    n_pairs = budget["pairs"]
    typer.echo(f"      semi-supervised (SOTAlign's setting): {n_pairs} pairs + the other train rows unpaired")
    shards = stages.feats / "world" / "train"
    unpaired = out / "semi" / "unpaired"
    image, text = _open_pair(shards)
    _write_unpaired(image, text, n_pairs, unpaired)
    runs = out / "semi" / "runs"
    pairs_run = RunConfig(val_fraction=0.0, limit=n_pairs, patience=0)
    sot_run = replace(pairs_run, epochs=budget["sot_epochs"], batch_size=budget["sot_batch"])
    pal_run = replace(pairs_run, epochs=budget["pal_epochs"], batch_size=n_pairs)
    plan = [  # (label, method, run config, params, unpaired stores)
        ("teacher alone (procrustes)", "procrustes", pairs_run, {}, None),
        ("sotalign + unpaired stores", "sotalign", sot_run, {}, unpaired),
        ("sotalign, pairs as its unpaired rows", "sotalign", sot_run, {}, None),
        (f"pal K{PAL_PARAMS['anchors']} lr {PAL_PARAMS['lr']}", "pal", pal_run, PAL_PARAMS, None),
    ]
    world_val = {"size": n_val}
    rows = []
    for label, method, run, params, extra in plan:
        name = f"{method}-{'unpaired' if extra else 'pairs'}"
        acfg = AlignConfig(
            shards=str(shards),
            out=str(runs / name),
            method=method,
            run=run,
            params=tuple(sorted(params.items())),
            unpaired_shards=str(extra) if extra else None,
        )
        res = run_align(acfg, progress=stages.cfg.progress)
        row: dict[str, Any] = {
            "setting": label,
            "run": str(res.path),
            "wall_s": round(res.meta.get("wall_seconds", 0.0), 1),
        }
        for task in ("retrieval", "classification", "segmentation"):
            r = stages.eval(
                task,
                res.path,
                "world",
                "val",
                world_val,
                protocol="pal" if task == "segmentation" else None,
                figures=False,
            )
            row |= {k: r.get(k) for k in KEYS[task]}
        rows.append(row)
    n_img, n_txt = (open_store(unpaired / f"{m}.zarr").layout.count for m in ("image", "text"))
    head = (
        f"World, {n_pairs} pairs (the first train images, one caption each per epoch) + {n_img} unpaired images "
        f"and {n_txt} unpaired captions (the other train rows, shuffled apart); world val ({n_val} images). No "
        f"held-out rows: fixed budgets, last epoch kept. SOTAlign {budget['sot_epochs']} epochs, batch "
        f"{budget['sot_batch']}; PAL {budget['pal_epochs']} epochs full batch. Percent."
    )
    cols = [
        ("i2t R@1", "text_retrieval_recall@1"),
        ("t2i R@1", "image_retrieval_recall@1"),
        ("cls acc1", "acc1"),
        ("seg mIoU", "mIoU"),
        ("seg fg mIoU", "fg_mIoU"),
    ]
    lines = [
        head,
        "",
        "| setting | " + " | ".join(c for c, _ in cols) + " | train s |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for r in rows:
        vals = " | ".join("-" if r[k] is None else f"{100 * r[k]:.1f}" for _, k in cols)
        lines.append(f"| {r['setting']} | {vals} | {r['wall_s']} |")
    _write_if_changed(out / "semi.md", "\n".join(lines) + "\n")
    _write_if_changed(
        out / "semi.json",
        json.dumps({"pairs": n_pairs, "unpaired_images": n_img, "unpaired_texts": n_txt, "rows": rows}, indent=2),
    )
    typer.echo("\n".join(lines))
    return out / "semi.md"


KEYS = {
    "retrieval": ("text_retrieval_recall@1", "image_retrieval_recall@1"),
    "classification": ("acc1",),
    "segmentation": ("mIoU", "fg_mIoU"),
}


def _open_pair(shards: Path) -> tuple[FeatureStore, FeatureStore]:
    side = (".prompts.zarr", ".phrases.zarr")  # class prompts and phrases are no captions
    stores = [open_store(p) for p in sorted(shards.glob("*.zarr")) if not p.name.endswith(side)]
    image = next(s for s in stores if s.layout.modality == "image")
    text = next(s for s in stores if s.layout.modality == "text")
    return image, text


def _write_unpaired(image: FeatureStore, text: FeatureStore, n_pairs: int, folder: Path) -> None:
    """Images n_pairs.. of the train store and the captions of those images, each in its own seeded shuffle, as two
    complete stores (`image.zarr`, `text.zarr`) with the source layouts (rows and shard sizes aside)."""
    kept = np.flatnonzero(~image["skipped"][:])
    paired = set(kept[:n_pairs].tolist())  # the images RunConfig.limit keeps (all train images have captions)
    rng = np.random.default_rng([SEED, 11])
    img_rows = rng.permutation(np.array([i for i in kept if i not in paired]))
    item = text["item"][:]
    txt_rows = rng.permutation(np.flatnonzero(~np.isin(item, list(paired))))
    for src, rows, name in ((image, img_rows, "image"), (text, txt_rows, "text")):
        _copy_rows(src, rows, folder / f"{name}.zarr")


def _copy_rows(src: FeatureStore, rows: np.ndarray, path: Path) -> None:
    lay = src.layout
    per_chunk, per_shard = default_rows(lay.tokens, lay.dim, len(rows))
    origin = dict(lay.origin or {}) | {"subset_of": str(src.path), "rows": f"{len(rows)} shuffled, seed {SEED}"}
    dst = create_store(
        path, replace(lay, count=len(rows), rows_per_chunk=per_chunk, rows_per_shard=per_shard, origin=origin)
    )
    if dst.attrs.get("complete"):
        return
    names = [n for n in expected_shapes(lay) if n not in ("done", "digest", "skipped")]
    for shard in dst.pending_shards():
        start, stop = dst.layout.shard_range(shard)
        block = rows[start:stop]
        order = np.argsort(block)  # zarr reads want increasing indices
        back = np.argsort(order)
        values = {n: src.read(n, block[order])[back] for n in names}
        if "item" in values:
            values["item"] = np.full(len(block), -1, dtype=values["item"].dtype)  # unpaired: links to no image
        dst.write_shard(shard, values, src.read("skipped", block[order])[back])
    dst.finalize()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
