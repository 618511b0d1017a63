"""`pipe align`: fit a method from the feature stores into a run dir (every method the same way, through align.loop).

Run dir: `method.json` + weights (`anchors.safetensors` for PAL, `weights.safetensors` otherwise) written when
training ends; `run.json` (method config, run config, encoders, stores, data fingerprints, per-epoch metrics, best
epoch, wall time, held-out retrieval), rewritten atomically after every epoch with `complete: false` until the end;
`loss.png`; `train.log` (one line per epoch and a summary; appended to by `--resume`); and while a trained method
trains, `checkpoint.pt` (written atomically after every epoch) from which
`--resume` continues to the same result as an unbroken run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipe_align.align.base import ImageRows, MethodConfig, TextRows, TrainedAligner, TrainingData
from pipe_align.align.data import (
    PairSource,
    PairStores,
    find_pair_stores,
    heldout_stores,
    keep_freed_host_memory,
    pair_split,
    store_fingerprint,
    stores_in,
)
from pipe_align.align.ddp import barrier_and_close, init_from_env, launched_world
from pipe_align.align.loop import RunConfig, fit, heldout_retrieval
from pipe_align.align.methods import get_method
from pipe_align.align.recipes import Plan, check_recipe, plan, search_small
from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_text
from pipe_align.extract.job import resolve_device
from pipe_align.extract.remote import location

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class AlignConfig:
    """One `pipe align` invocation; persisted in run.json as "align"."""

    shards: str
    out: str
    method: str = "pal"
    image_encoder: str | None = None
    text_encoder: str | None = None
    resume: bool = False
    unpaired_shards: str | None = None
    recipe: str | None = None  # PAL: auto (default), paper or small (align.recipes); other methods: none
    run: RunConfig = field(default_factory=RunConfig)
    params: tuple[tuple[str, Any], ...] = ()  # the method's own options (fields of its Config)


@dataclass
class AlignResult:
    path: Path
    meta: dict[str, Any]  # run.json

    @property
    def heldout_mean_r1(self) -> float | None:
        return self.meta.get("heldout", {}).get("heldout_mean_r1")


def method_config(method: str, params: dict[str, Any]) -> MethodConfig:
    cls = get_method(method)
    names = {f.name: f for f in fields(cls.Config)}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise PipeError(f"method {method} has no option {', '.join(unknown)}; its options: {', '.join(sorted(names))}")
    try:
        return cls.Config(**params)
    except (TypeError, ValueError) as e:
        raise PipeError(f"method {method}: bad option value ({e})") from None


def run_align(cfg: AlignConfig, progress: bool = True, verbose: bool = False) -> AlignResult:
    """Train (or resume, or return the finished run when nothing changed) and write the run dir. A PAL recipe
    (align.recipes) is resolved first; one that searches on the held-out pairs does so once, and its choice, kept in
    run.json, is what a resumed or repeated run uses."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PipeError(f"--out {out}: is a file")
    method = get_method(cfg.method)
    recipe = check_recipe(method, cfg.recipe)
    given = dict(cfg.params)
    method_config(cfg.method, given)  # bad option names and values fail before anything runs
    stores = find_pair_stores(cfg.shards, cfg.image_encoder, cfg.text_encoder)
    held = heldout_stores(cfg.run.val_shards, stores) if cfg.run.val_shards else None
    request = {"recipe": recipe, "params": given, "run": cfg.run.training_key(),
               "fingerprint": {"image": store_fingerprint(stores.image), "text": store_fingerprint(stores.text)}}
    if held is not None:  # the held-out stores decide early stopping: other ones are another run
        request["val_fingerprint"] = {"image": store_fingerprint(held.image), "text": store_fingerprint(held.text)}
    run_json = out / "run.json"
    prev = _read_json(run_json) if run_json.exists() else {}
    if prev.get("complete") and prev.get("request") != request:
        raise PipeError(f"--out {out}: holds a finished run with other settings or data; choose another --out")
    if (out / "checkpoint.pt").exists() and not cfg.resume:
        raise PipeError(f"{out}: has an unfinished run (checkpoint.pt); pass --resume to continue it")
    if (out / "checkpoint.pt").exists() and prev.get("request") not in (None, request):  # before any recipe search
        raise PipeError(f"{out / 'checkpoint.pt'}: was written with other options or data; resume with the same ones, "
                        "or use another --out")  # fmt: skip
    split = pair_split(stores, cfg.run.val_fraction, cfg.run.seed, cfg.run.limit)
    chosen = _reuse_plan(prev, request) or (plan(recipe, given, cfg.run, len(split.train)) if recipe else
                                             Plan(given, cfg.run.resolved(method), {}))  # fmt: skip
    if chosen is not None:
        mcfg = method_config(cfg.method, chosen.params)
        key = _run_key(cfg, mcfg, chosen.run, stores)
        if prev.get("complete"):
            return _finished(out, prev, key)
        _check_resumable(out, prev, key)
    device = resolve_device(cfg.run.device)
    keep_freed_host_memory()
    dp = None
    if launched_world() > 1:
        dp, device = init_from_env(device)
    main = dp is None or dp.main
    tokens = method.wants_tokens(method_config(cfg.method, chosen.params if chosen else given))

    def source(rows, pairs=stores, captions=split.captions):
        return PairSource(pairs, rows, captions, tokens=tokens, device=device, memory_budget=cfg.run.memory_budget,
                          caption_rule=cfg.run.captions)  # fmt: skip

    train, val = source(split.train), (source(split.val) if len(split.val) >= 2 else None)
    if held is not None:
        held_split = pair_split(held, 0.0, cfg.run.seed)  # every pair of the other store set is held out
        val = source(held_split.train, held, held_split.captions)
    unpaired = _load_unpaired(cfg, stores) if cfg.unpaired_shards else None
    data = TrainingData(train, val, unpaired)
    t0 = time.perf_counter()
    if chosen is None:  # the small-data search, on the held-out pairs of the training split
        chosen = search_small(given, cfg.run, data, recipe, dp=dp, say=progress and main)
        chosen.record["search_seconds"] = round(time.perf_counter() - t0, 2)
        mcfg = method_config(cfg.method, chosen.params)
        key = _run_key(cfg, mcfg, chosen.run, stores)
        if prev.get("complete"):
            return _finished(out, prev, key)
    run = chosen.run
    out.mkdir(parents=True, exist_ok=True)
    meta = _run_meta(cfg, mcfg, run, stores, train, split) | _heldout_meta(held, val) | {
        "key": key, "fingerprint": key["fingerprint"], "data_parallel": dp.world if dp else 1, "request": request,
        "recipe": chosen.record | {"params": chosen.params, "run": asdict(run)} if chosen.record else None}  # fmt: skip

    def on_epoch(history: list[dict]) -> None:
        if main:
            write_json(run_json, meta | {"history": history})

    if main:
        write_json(run_json, meta)  # complete: false until the end
    trained = issubclass(method, TrainedAligner)
    if main and not (out / "checkpoint.pt").exists():  # a fresh training: no epoch lines of an earlier one
        (out / "train.log").unlink(missing_ok=True)
    result = fit(method, mcfg, run, data, checkpoint=out / "checkpoint.pt" if trained else None, resume=cfg.resume,
                 key=key, dp=dp, on_epoch=on_epoch, progress=progress, log=out / "train.log",
                 verbose=verbose)  # fmt: skip
    if not main:  # rank 0 writes the run
        barrier_and_close(dp)
        return AlignResult(out, meta)
    aligner = result.aligner
    meta |= {"history": result.history, "fit": result.info, "wall_seconds": time.perf_counter() - t0}
    meta["best_epoch"] = result.info.get("best_epoch") if trained else None
    meta["heldout"] = heldout_retrieval(aligner, val, run.seed) if val is not None else {}
    aligner.save(out)
    _plot_loss(result.history, out / "loss.png", cfg.method, result.info.get("best_epoch") if trained else None)
    meta["complete"] = True
    write_json(run_json, meta)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    barrier_and_close(dp)
    return AlignResult(out, meta)


def _check_resumable(out: Path, prev: dict, key: dict) -> None:
    """A checkpoint is resumed only by the run run.json says wrote it: checked before any data or the checkpoint is
    loaded (the checkpoint's own key is checked again when it is read)."""
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and prev.get("key") not in (None, key):
        raise PipeError(f"{ckpt}: was written with other options or data; resume with the same ones, or use another "
                        "--out")  # fmt: skip


def _finished(out: Path, prev: dict, key: dict) -> AlignResult:
    if prev.get("key") == key:
        return AlignResult(out, prev)  # already trained with these settings on this data
    raise PipeError(f"--out {out}: holds a finished run with other settings or data; choose another --out")


def _reuse_plan(prev: dict, request: dict) -> Plan | None:
    """The recipe a previous run of this request resolved (its search is not repeated on resume or re-run)."""
    rec = prev.get("recipe")
    if prev.get("request") != request or not rec or "params" not in rec:
        return None
    return Plan(dict(rec["params"]), RunConfig(**rec["run"]), {k: v for k, v in rec.items() if k not in ("params",
                                                                                                        "run")})


def write_json(path: Path, obj: Any) -> None:
    """Written to an exclusive temporary, then renamed: a reader never sees half a file (extract.files)."""
    write_text(path, json.dumps(obj, indent=2))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PipeError(f"{path}: is not valid JSON (a damaged run dir); remove it or choose another --out") from None


def _run_key(cfg: AlignConfig, mcfg: MethodConfig, run: RunConfig, stores: PairStores) -> dict[str, Any]:
    """What a run's result depends on: a finished run is reused, and a checkpoint resumed, only when this matches
    (the stores' paths resolved, and their content fingerprints, so re-extracted stores are never mistaken)."""
    return {
        "method": cfg.method, "config": asdict(mcfg), "run": run.training_key(),
        "image_store": str(stores.image.path.resolve()), "text_store": str(stores.text.path.resolve()),
        "fingerprint": {"image": store_fingerprint(stores.image), "text": store_fingerprint(stores.text)},
        "unpaired_shards": str(location(cfg.unpaired_shards).resolve()) if cfg.unpaired_shards else None,
    }  # fmt: skip


def _run_meta(cfg: AlignConfig, mcfg: MethodConfig, run: RunConfig, stores: PairStores, train: PairSource,
              split) -> dict[str, Any]:  # fmt: skip
    si, st = stores.image, stores.text
    return {
        "method": cfg.method, "config": asdict(mcfg), "run": asdict(run),
        "align": {k: v for k, v in asdict(cfg).items() if k not in ("run", "params")} | {"params": dict(cfg.params)},
        "image_encoder": si.layout.encoder.get("alias"), "text_encoder": st.layout.encoder.get("alias"),
        "image_weights": si.layout.encoder.get("weights"), "text_weights": st.layout.encoder.get("weights"),
        "image_layer": si.layout.encoder.get("layer"), "text_layer": st.layout.encoder.get("layer"),
        "dataset": si.layout.dataset, "split": si.layout.split,
        "image_store": str(si.path), "text_store": str(st.path),
        "encoders": {"image": _encoder_record(si), "text": _encoder_record(st)},
        "pairs": {"train": int(len(split.train)), "val": int(len(split.val)), "val_ids": _ids_digest(si, split.val)},
        "tokens": {"image": "patches+cls" if getattr(mcfg, "use_cls", False) else "patches"},
        "data_mode": "memory" if train.in_memory else "stream", "complete": False,
    }  # fmt: skip


def _heldout_meta(held: PairStores | None, val: PairSource | None) -> dict[str, Any]:
    """Where the held-out pairs came from, when another store set holds them (`--val-shards`)."""
    if held is None or val is None:
        return {}
    return {"heldout_stores": {"image": str(held.image.path), "text": str(held.text.path), "pairs": len(val),
                               "dataset": held.image.layout.dataset, "split": held.image.layout.split}}  # fmt: skip


def _encoder_record(store) -> dict[str, Any]:
    """What rebuilding the encoder needs without the store (`pipelines.api.load` on another machine): the store's
    encoder attributes, its precision and, for images, the resize rule and patch grid of the extraction."""
    lay = store.layout
    extra = {"resize": lay.resize, "grid": list(lay.grid) if lay.grid else None} if lay.modality == "image" else {}
    return dict(lay.encoder) | {"dtype": lay.dtype} | extra


def _ids_digest(store, rows: np.ndarray) -> str:
    """Identifies the held-out images (the same for every method given seed and fraction) without listing them."""
    ids = store["ids"][:][rows] if len(rows) else []
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def _load_unpaired(cfg: AlignConfig, paired: PairStores) -> tuple[ImageRows, TextRows]:
    """Image rows and caption rows of `--unpaired-shards` (their pairing, if any, unused), from stores of the same
    encoders (alias and layer) as the paired ones: complete, skipped images dropped, every value finite."""
    folder = location(cfg.unpaired_shards)
    stores = stores_in(folder)
    picked = []
    for st in (paired.image, paired.text):
        enc = st.layout.encoder
        same = [s for s in stores if s.layout.modality == st.layout.modality and s.layout.encoder.get("alias")
                == enc.get("alias") and s.layout.encoder.get("layer") == enc.get("layer")]  # fmt: skip
        what = f"{st.layout.modality} store of {enc.get('alias')} (layer {enc.get('layer')})"
        if not same:
            found = ", ".join(s.path.name for s in stores) or "no stores"
            raise PipeError(f"--unpaired-shards {folder}: no {what}, the encoder of the paired stores (found: {found})")
        if len(same) > 1:
            raise PipeError(f"--unpaired-shards {folder}: several {what}: "
                            + ", ".join(s.path.name for s in same) + "; keep one per folder")  # fmt: skip
        same[0].require_complete()
        picked.append(same[0])
    img_st, txt_st = picked
    kept = np.flatnonzero(~img_st["skipped"][:])  # skipped images were never written (NaN fill)
    cls, pooled = img_st.rows("cls")[torch.from_numpy(kept)].float(), txt_st.rows("pooled").float()
    for st, name, t, row_ids in ((img_st, "cls", cls, kept), (txt_st, "pooled", pooled, np.arange(len(pooled)))):
        bad = torch.nonzero(~torch.isfinite(t).all(1))
        if len(bad):
            raise PipeError(f"{st.path}: array {name!r} has non-finite values in row {int(row_ids[int(bad[0])])} "
                            "(see `pipe verify`)")  # fmt: skip
    return ImageRows(cls=cls), TextRows(pooled=pooled)


def _plot_loss(history: list[dict], path: Path, method: str, best_epoch: int | None = None) -> None:
    if not history or not any(k in history[0] for k in ("train_loss", "val_loss")):
        return  # closed-form methods have no loss curve
    loss_figure(history, method, best_epoch).savefig(path)


def loss_figure(history: list[dict], method: str, best_epoch: int | None = None) -> Figure:
    """Train and held-out loss per epoch, the kept (best) epoch marked. A bare `Figure`, never pyplot or
    `matplotlib.use`: drawing it changes nothing in the caller's matplotlib (a notebook keeps its backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    ep = [h["epoch"] for h in history]
    if "train_loss" in history[0]:
        ax.plot(ep, [h["train_loss"] for h in history], label="train")
    if "val_loss" in history[0]:
        ax.plot(ep, [h["val_loss"] for h in history], label="held-out")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="0.4", linestyle="--", linewidth=1, label=f"best epoch {best_epoch} (kept)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{method}: loss per epoch")
    ax.legend()
    fig.tight_layout()
    return fig
