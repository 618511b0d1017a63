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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_text
from pipe_align.extract.remote import location
from pipe_align.extract.runtime import resolve_device

from .base import (
    Aligner,
    ImageRows,
    MethodConfig,
    Plan,
    TextRows,
    TrainedAligner,
    TrainingData,
)
from .data import (
    PairSource,
    PairStores,
    Split,
    find_pair_stores,
    heldout_stores,
    keep_freed_host_memory,
    pair_split,
    store_fingerprint,
    stores_in,
)
from .ddp import DataParallel, barrier_and_close, init_from_env, launched_world
from .loop import FitResult, RunConfig, fit, heldout_retrieval
from .methods import get_method

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class AlignConfig:
    """One `pipe align` invocation; persisted in run.json as "align". `params` are the options of the method the user
    gave (fields of its Config; a mapping, or (name, value) pairs), checked once when the config is made: an unknown
    name or a bad value is a PipeError before anything runs. `given` is them typed, the Config's defaults for the
    rest; the method's preset (`preset`; PAL: auto, paper or small) fills in what the user left out."""

    shards: str
    out: str
    method: str = "pal"
    image_encoder: str | None = None
    text_encoder: str | None = None
    resume: bool = False
    unpaired_shards: str | None = None
    preset: str | None = None  # one of the method's `presets` (its first when None); a method without presets: none
    run: RunConfig = field(default_factory=RunConfig)
    params: Mapping[str, Any] = field(default_factory=dict)  # the method's own options the user gave

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(sorted(dict(self.params).items())))
        self.given  # noqa: B018 (validates the options once, here)

    @cached_property
    def given(self) -> MethodConfig:
        return method_config(self.method, self.params)


@dataclass
class AlignResult:
    path: Path
    meta: dict[str, Any]  # run.json

    @property
    def heldout_mean_r1(self) -> float | None:
        return self.meta.get("heldout", {}).get("heldout_mean_r1")


def method_config(method: str, params: Mapping[str, Any]) -> MethodConfig:
    cls = get_method(method)
    names = {f.name: f for f in fields(cls.Config)}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise PipeError(f"method {method} has no option {', '.join(unknown)}; its options: {', '.join(sorted(names))}")
    try:
        return cls.Config(**params)
    except (TypeError, ValueError) as e:
        raise PipeError(f"method {method}: bad option value ({e})") from None


@dataclass(frozen=True)
class Job:
    """What `resolve_run` settled before any data is read: the stores, the split, what the user asked for (`request`:
    what a finished run or a preset's earlier choice is reused by), the run dir's earlier run.json, and, once the
    preset's plan is known, the typed method config and the run key."""

    cfg: AlignConfig
    method: type[Aligner]
    out: Path
    preset: str | None
    stores: PairStores
    held: PairStores | None  # --val-shards: the stores of the held-out pairs
    split: Split
    request: dict[str, Any]
    prev: dict[str, Any]  # run.json already in the run dir ({} when none)
    plan: Plan | None = None  # None until the preset's search has seen the data
    config: MethodConfig | None = None  # the plan's, typed
    key: dict[str, Any] | None = None  # what the result depends on (_run_key)

    def planned(self, plan: Plan) -> Job:
        """This job with its plan: the typed config and the run key follow from it (the one place they are built)."""
        config = method_config(self.cfg.method, plan.params) if plan.params != self.cfg.params else self.cfg.given
        return replace(
            self,
            plan=plan,
            config=config,
            key=_run_key(self.cfg, config, plan.run, self.stores, self.request["fingerprint"]),
        )

    def finished(self) -> AlignResult | None:
        """The run dir's finished run when it is this one; another finished run there is refused."""
        return _finished(self.out, self.prev, self.key) if self.prev.get("complete") else None


@dataclass
class Loaded:
    """The data sources of a job, on its device, and this process's place in data parallelism."""

    data: TrainingData
    dp: DataParallel | None
    started: float  # perf_counter when the data were ready (the run's wall time counts from here)

    @property
    def main(self) -> bool:
        return self.dp is None or self.dp.main


def run_align(cfg: AlignConfig, progress: bool = True, verbose: bool = False) -> AlignResult:
    """Train (or resume, or return the finished run when nothing changed) and write the run dir, in this order:
    resolve (options, stores, the method's preset plan, the run key) -> load (the data sources) -> search (only when
    the preset chooses on the data; once: its choice, kept in run.json, is what a resumed or repeated run uses) ->
    fit (the one training loop, checkpointed) -> write (the run dir; rank 0 under data parallelism)."""
    job = resolve_run(cfg)
    done = job.finished() if job.plan is not None else None
    if done is not None:
        return done
    loaded = load_data(job)
    if job.plan is None:
        job = search_preset(job, loaded, say=progress and loaded.main)
        done = job.finished()
        if done is not None:
            return done
    result, meta = fit_run(job, loaded, progress, verbose)
    return write_run(job, loaded, result, meta)


def resolve_run(cfg: AlignConfig) -> Job:
    """The options, the stores and the split, checked against what the run dir holds before any data is read; then
    the method's preset plan (unless it needs the data) and the run key."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PipeError(f"--out {out}: is a file")
    method = get_method(cfg.method)
    preset = method.check_preset(cfg.preset)
    stores = find_pair_stores(cfg.shards, cfg.image_encoder, cfg.text_encoder)
    held = heldout_stores(cfg.run.val_shards, stores) if cfg.run.val_shards else None
    request = {
        "preset": preset,
        "params": dict(cfg.params),
        "run": cfg.run.training_key(),
        "fingerprint": {"image": store_fingerprint(stores.image), "text": store_fingerprint(stores.text)},
    }
    if held is not None:  # the held-out stores decide early stopping: other ones are another run
        request["val_fingerprint"] = {"image": store_fingerprint(held.image), "text": store_fingerprint(held.text)}
    run_json = out / "run.json"
    prev = _read_json(run_json) if run_json.exists() else {}
    if prev.get("complete") and prev.get("request") != request:
        raise PipeError(f"--out {out}: holds a finished run with other settings or data; choose another --out")
    if (out / "checkpoint.pt").exists() and not cfg.resume:
        raise PipeError(f"{out}: has an unfinished run (checkpoint.pt); pass --resume to continue it")
    if (out / "checkpoint.pt").exists() and prev.get("request") not in (None, request):  # before any preset search
        raise PipeError(
            f"{out / 'checkpoint.pt'}: was written with other options or data; resume with the same ones, "
            "or use another --out"
        )
    split = pair_split(stores, cfg.run.val_fraction, cfg.run.seed, cfg.run.limit)
    job = Job(cfg, method, out, preset, stores, held, split, request, prev)
    plan = _reuse_plan(prev, request) or method.preset_plan(preset, dict(cfg.params), cfg.run, len(split.train))
    if plan is None:
        return job
    job = job.planned(plan)
    if not prev.get("complete"):
        _check_resumable(out, prev, job.key)
    return job


def load_data(job: Job) -> Loaded:
    """The training pairs, the held-out pairs (of the split, or of `--val-shards`) and any unpaired rows, as sources
    on the run's device (in memory when they fit the budget, streamed otherwise); data parallelism joined first."""
    cfg, stores = job.cfg, job.stores
    device = resolve_device(cfg.run.device)
    keep_freed_host_memory()
    dp = None
    if launched_world() > 1:
        dp, device = init_from_env(device)
    tokens = job.method.wants_tokens(job.config or cfg.given)  # before a search: the user's options decide

    def source(rows, pairs=stores, captions=job.split.captions):
        return PairSource(
            pairs,
            rows,
            captions,
            tokens=tokens,
            device=device,
            memory_budget=cfg.run.memory_budget,
            caption_rule=cfg.run.captions,
        )

    train, val = source(job.split.train), (source(job.split.val) if len(job.split.val) >= 2 else None)
    if job.held is not None:
        held_split = pair_split(job.held, 0.0, cfg.run.seed)  # every pair of the other store set is held out
        val = source(held_split.train, job.held, held_split.captions)
    unpaired = _load_unpaired(cfg, stores) if cfg.unpaired_shards else None
    return Loaded(TrainingData(train, val, unpaired), dp, time.perf_counter())


def search_preset(job: Job, loaded: Loaded, say: bool) -> Job:
    """The preset's choice on the data (the held-out pairs of the training split), made once: its time is recorded."""
    plan = job.method.preset_search(job.preset, dict(job.cfg.params), job.cfg.run, loaded.data, dp=loaded.dp, say=say)
    plan.record["search_seconds"] = round(time.perf_counter() - loaded.started, 2)
    return job.planned(plan)


def fit_run(job: Job, loaded: Loaded, progress: bool, verbose: bool) -> tuple[FitResult, dict[str, Any]]:
    """Fit through the one loop; run.json is written before the first epoch (`complete: false`, with the preset's
    plan, so a resumed run reuses it) and after every epoch; a trained method checkpoints every epoch."""
    cfg, out, plan, data = job.cfg, job.out, job.plan, loaded.data
    out.mkdir(parents=True, exist_ok=True)
    meta = _run_meta(cfg, job.config, plan.run, job.stores, data.train, job.split) | _heldout_meta(job.held, data.val)
    meta |= {
        "key": job.key,
        "fingerprint": job.key["fingerprint"],
        "request": job.request,
        "data_parallel": loaded.dp.world if loaded.dp else 1,
        "preset": plan.record | {"params": plan.params, "run": asdict(plan.run)} if plan.record else None,
    }

    def on_epoch(history: list[dict]) -> None:
        if loaded.main:
            write_json(out / "run.json", meta | {"history": history})

    if loaded.main:
        write_json(out / "run.json", meta)  # complete: false until the end
    trained = issubclass(job.method, TrainedAligner)
    if loaded.main and not (out / "checkpoint.pt").exists():  # a fresh training: no epoch lines of an earlier one
        (out / "train.log").unlink(missing_ok=True)
    result = fit(
        job.method,
        job.config,
        plan.run,
        data,
        checkpoint=out / "checkpoint.pt" if trained else None,
        resume=cfg.resume,
        key=job.key,
        dp=loaded.dp,
        on_epoch=on_epoch,
        progress=progress,
        log=out / "train.log",
        verbose=verbose,
    )
    return result, meta


def write_run(job: Job, loaded: Loaded, result: FitResult, meta: dict[str, Any]) -> AlignResult:
    """The run dir, by rank 0 only: weights and method.json, held-out retrieval, loss.png, then run.json marked
    complete, and only then the checkpoint removed (a kill in between leaves a resumable run, never a half one)."""
    out, dp = job.out, loaded.dp
    if not loaded.main:  # rank 0 writes the run
        barrier_and_close(dp)
        return AlignResult(out, meta)
    trained = issubclass(job.method, TrainedAligner)
    best = result.info.get("best_epoch") if trained else None
    meta |= {"history": result.history, "fit": result.info, "wall_seconds": time.perf_counter() - loaded.started}
    meta["best_epoch"] = best
    val = loaded.data.val
    meta["heldout"] = heldout_retrieval(result.aligner, val, job.plan.run.seed) if val is not None else {}
    result.aligner.save(out)
    _plot_loss(result.history, out / "loss.png", job.cfg.method, best)
    meta["complete"] = True
    write_json(out / "run.json", meta)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    barrier_and_close(dp)
    return AlignResult(out, meta)


def _check_resumable(out: Path, prev: dict, key: dict) -> None:
    """A checkpoint is resumed only by the run run.json says wrote it: checked before any data or the checkpoint is
    loaded (the checkpoint's own key is checked again when it is read)."""
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and prev.get("key") not in (None, key):
        raise PipeError(
            f"{ckpt}: was written with other options or data; resume with the same ones, or use another --out"
        )


def _finished(out: Path, prev: dict, key: dict) -> AlignResult:
    if prev.get("key") == key:
        return AlignResult(out, prev)  # already trained with these settings on this data
    raise PipeError(f"--out {out}: holds a finished run with other settings or data; choose another --out")


def _reuse_plan(prev: dict, request: dict) -> Plan | None:
    """The plan a previous run of this request resolved (a preset's search is not repeated on resume or re-run)."""
    rec = prev.get("preset")
    if prev.get("request") != request or not rec or "params" not in rec:
        return None
    return Plan(
        dict(rec["params"]), RunConfig(**rec["run"]), {k: v for k, v in rec.items() if k not in ("params", "run")}
    )


def _legacy_names(prev: dict) -> dict:
    """run.json of runs made before presets had their name: "recipe" read as "preset", so those runs are reused and
    resumed as before."""
    prev = dict(prev)
    for part in ("request", "align"):
        if isinstance(prev.get(part), dict) and "recipe" in prev[part] and "preset" not in prev[part]:
            prev[part] = {("preset" if k == "recipe" else k): v for k, v in prev[part].items()}
    if "recipe" in prev and "preset" not in prev:
        prev = {("preset" if k == "recipe" else k): v for k, v in prev.items()}
    return prev


def write_json(path: Path, obj: Any) -> None:
    """Written to an exclusive temporary, then renamed: a reader never sees half a file (extract.files)."""
    write_text(path, json.dumps(obj, indent=2))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except ValueError:
        raise PipeError(f"{path}: is not valid JSON (a damaged run dir); remove it or choose another --out") from None
    if not isinstance(obj, dict):
        raise PipeError(f"{path}: is not a JSON object (a damaged run dir); remove it or choose another --out")
    return _legacy_names(obj)


def _run_key(
    cfg: AlignConfig, mcfg: MethodConfig, run: RunConfig, stores: PairStores, fingerprint: dict[str, str]
) -> dict[str, Any]:
    """What a run's result depends on: a finished run is reused, and a checkpoint resumed, only when this matches
    (the stores' paths resolved, and their content fingerprints, `store_fingerprint` of each store as the request
    computed them once, so re-extracted stores are never mistaken)."""
    return {
        "method": cfg.method,
        "config": asdict(mcfg),
        "run": run.training_key(),
        "image_store": str(stores.image.path.resolve()),
        "text_store": str(stores.text.path.resolve()),
        "fingerprint": dict(fingerprint),
        "unpaired_shards": str(location(cfg.unpaired_shards).resolve()) if cfg.unpaired_shards else None,
    }


def _run_meta(
    cfg: AlignConfig, mcfg: MethodConfig, run: RunConfig, stores: PairStores, train: PairSource, split
) -> dict[str, Any]:
    si, st = stores.image, stores.text
    return {
        "method": cfg.method,
        "config": asdict(mcfg),
        "run": asdict(run),
        "align": {k: v for k, v in asdict(cfg).items() if k not in ("run", "params")} | {"params": dict(cfg.params)},
        "image_encoder": si.layout.encoder.get("alias"),
        "text_encoder": st.layout.encoder.get("alias"),
        "image_weights": si.layout.encoder.get("weights"),
        "text_weights": st.layout.encoder.get("weights"),
        "image_layer": si.layout.encoder.get("layer"),
        "text_layer": st.layout.encoder.get("layer"),
        "dataset": si.layout.dataset,
        "split": si.layout.split,
        "image_store": str(si.path),
        "text_store": str(st.path),
        "encoders": {"image": _encoder_record(si), "text": _encoder_record(st)},
        "pairs": {"train": int(len(split.train)), "val": int(len(split.val)), "val_ids": _ids_digest(si, split.val)},
        "tokens": {"image": "patches+cls" if getattr(mcfg, "use_cls", False) else "patches"},
        "data_mode": "memory" if train.in_memory else "stream",
        "complete": False,
    }


def _heldout_meta(held: PairStores | None, val: PairSource | None) -> dict[str, Any]:
    """Where the held-out pairs came from, when another store set holds them (`--val-shards`)."""
    if held is None or val is None:
        return {}
    return {
        "heldout_stores": {
            "image": str(held.image.path),
            "text": str(held.text.path),
            "pairs": len(val),
            "dataset": held.image.layout.dataset,
            "split": held.image.layout.split,
        }
    }


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
        same = [
            s
            for s in stores
            if s.layout.modality == st.layout.modality
            and s.layout.encoder.get("alias") == enc.get("alias")
            and s.layout.encoder.get("layer") == enc.get("layer")
        ]
        what = f"{st.layout.modality} store of {enc.get('alias')} (layer {enc.get('layer')})"
        if not same:
            found = ", ".join(s.path.name for s in stores) or "no stores"
            raise PipeError(f"--unpaired-shards {folder}: no {what}, the encoder of the paired stores (found: {found})")
        if len(same) > 1:
            raise PipeError(
                f"--unpaired-shards {folder}: several {what}: "
                + ", ".join(s.path.name for s in same)
                + "; keep one per folder"
            )
        same[0].require_complete()
        picked.append(same[0])
    img_st, txt_st = picked
    kept = np.flatnonzero(~img_st["skipped"][:])  # skipped images were never written (NaN fill)
    cls, pooled = img_st.rows("cls")[torch.from_numpy(kept)].float(), txt_st.rows("pooled").float()
    for st, name, t, row_ids in ((img_st, "cls", cls, kept), (txt_st, "pooled", pooled, np.arange(len(pooled)))):
        bad = torch.nonzero(~torch.isfinite(t).all(1))
        if len(bad):
            raise PipeError(
                f"{st.path}: array {name!r} has non-finite values in row {int(row_ids[int(bad[0])])} "
                "(see `pipe verify`)"
            )
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
