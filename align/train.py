"""`pipe align`: train a method from the feature stores into a run dir; PAL's trainer is resumable.

Run dir: `method.json` + weights (`anchors.safetensors` for PAL) written when training ends, `run.json` (config,
encoders, stores, data fingerprints, metrics per epoch, best epoch, wall time), `loss.png`, and while PAL trains
`checkpoint.pt` (anchors, optimiser, schedule and early-stopping state, written atomically after every epoch).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipe_align.align.base import MethodConfig, get_method, l2n
from pipe_align.align.data import (
    PairSource,
    PairStores,
    find_pair_stores,
    keep_freed_host_memory,
    pair_split,
    store_fingerprint,
)
from pipe_align.align.ddp import (
    DataParallel,
    barrier_and_close,
    gather_rows,
    init_from_env,
    launched_world,
    sum_gradients,
)
from pipe_align.align.pal import PAL, PALConfig, cosine_lr, image_token_view, info_nce
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import resolve_device


class NaNLoss(PipeError):
    pass


class Trainer:
    """PAL's training loop: AdamW on the two anchor banks, cosine schedule with warm-up, grad clipping, early stopping
    on the held-out pairs, a checkpoint per epoch so that `--resume` gives the same anchors as an unbroken run."""

    def __init__(
        self, config: PALConfig, train: PairSource, val: PairSource | None, device: str, dp: DataParallel | None = None
    ) -> None:
        self.cfg, self.train, self.val, self.device, self.dp = config, train, val, device, dp
        lay_i, lay_t = train.stores.image.layout, train.stores.text.layout
        init = PAL(config, lay_i.dim, lay_t.dim)
        self.img_a = torch.nn.Parameter(init.image_anchors.to(device))
        self.txt_a = torch.nn.Parameter(init.text_anchors.to(device))
        self.opt = torch.optim.AdamW(
            [self.img_a, self.txt_a], lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
        )
        self.steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup = round(config.warmup_epochs * self.steps_per_epoch)
        self.epoch, self.step, self.bad_epochs = 0, 0, 0
        self.best = {"val_loss": math.inf, "epoch": -1, "image_anchors": None, "text_anchors": None}
        self.history: list[dict[str, Any]] = []

    # -- one epoch ------------------------------------------------------------------------------------------------
    def loss(self, batch, img_a, txt_a) -> torch.Tensor:
        tokens, mask = image_token_view(batch.image, self.cfg.use_cls)
        from pipe_align.align.kernel import anchor_profiles

        h_img = l2n(anchor_profiles(tokens, mask, img_a, self.cfg.tau_p))
        h_txt = l2n(anchor_profiles(batch.text.tokens, batch.text.mask(), txt_a, self.cfg.tau_p))
        if self.dp is not None:  # the whole batch's profiles; the loss is the single-process one
            h_img, h_txt = gather_rows(h_img, batch.sizes, self.dp), gather_rows(h_txt, batch.sizes, self.dp)
        return info_nce(h_img, h_txt, self.cfg.tau)

    def train_epoch(self, on_step: Callable[[int, float], None] | None = None) -> float:
        losses, n = 0.0, 0
        part = self.dp.part if self.dp is not None else None
        min_rows = max(2, self.dp.world if self.dp is not None else 1)  # negatives, and a row for every rank
        for batch in self.train.batches(self.epoch, self.cfg.batch_size, self.cfg.seed, part=part):
            if batch.total < min_rows:
                continue
            lr = cosine_lr(self.step, self.total_steps, self.warmup, self.cfg.lr)
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss = self.loss(batch, self.img_a, self.txt_a)
            if not torch.isfinite(loss):
                raise NaNLoss(f"loss is {loss.item()} at epoch {self.epoch} step {self.step}; training stopped, the "
                              "last good checkpoint is kept (lower --lr or check the stores with `pipe verify`)")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.dp is not None:
                sum_gradients([self.img_a, self.txt_a])  # each rank's backward covers only its own rows
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([self.img_a, self.txt_a], self.cfg.grad_clip)
            self.opt.step()
            self.step += 1
            losses += loss.item() * batch.total
            n += batch.total
            if on_step:
                on_step(batch.total, loss.item())
        return losses / max(n, 1)

    @torch.no_grad()
    def val_metrics(self) -> dict[str, float]:
        if self.val is None or len(self.val) < 2:
            return {}
        from pipe_align.align.retrieval import retrieval_metrics

        losses, n, h_i, h_t = 0.0, 0, [], []
        for batch in self.val.batches(0, self.cfg.batch_size, self.cfg.seed, shuffle=False):
            if len(batch.rows) < 2:
                continue
            tokens, mask = image_token_view(batch.image, self.cfg.use_cls)
            from pipe_align.align.kernel import anchor_profiles

            hi = l2n(anchor_profiles(tokens, mask, self.img_a, self.cfg.tau_p))
            ht = l2n(anchor_profiles(batch.text.tokens, batch.text.mask(), self.txt_a, self.cfg.tau_p))
            losses += info_nce(hi, ht, self.cfg.tau).item() * len(batch.rows)
            n += len(batch.rows)
            h_i.append(hi.cpu())
            h_t.append(ht.cpu())
        if n == 0:
            return {}
        hi, ht = torch.cat(h_i), torch.cat(h_t)
        r = retrieval_metrics(hi, ht, torch.arange(len(ht)), ks=(1, 5))
        i2t, t2i = r["text_retrieval_recall@1"], r["image_retrieval_recall@1"]
        return {"val_loss": losses / n, "val_i2t_r1": i2t, "val_t2i_r1": t2i}

    # -- state ----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "image_anchors": self.img_a.detach().cpu(), "text_anchors": self.txt_a.detach().cpu(),
            "opt": self.opt.state_dict(), "epoch": self.epoch, "step": self.step, "bad_epochs": self.bad_epochs,
            "best": self.best, "history": self.history, "config": asdict(self.cfg),
        }  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        ia, ta = state["image_anchors"], state["text_anchors"]
        if ia.shape != self.img_a.shape or ta.shape != self.txt_a.shape:
            raise PipeError(f"checkpoint anchors {tuple(ia.shape)} / {tuple(ta.shape)} do not match these stores and "
                            f"--anchors ({tuple(self.img_a.shape)} / {tuple(self.txt_a.shape)})")
        with torch.no_grad():
            self.img_a.copy_(ia)
            self.txt_a.copy_(ta)
        self.opt.load_state_dict(state["opt"])
        self.epoch, self.step, self.bad_epochs = state["epoch"], state["step"], state["bad_epochs"]
        self.best, self.history = state["best"], state["history"]

    def finished(self) -> bool:
        stop = self.cfg.patience > 0 and self.bad_epochs >= self.cfg.patience
        return self.epoch >= self.cfg.epochs or stop

    def run(self, log: Callable[[dict], None] | None = None, checkpoint: Path | None = None,
            on_step: Callable[[int, float], None] | None = None) -> PAL:  # fmt: skip
        while not self.finished():
            t0 = time.perf_counter()
            train_loss = self.train_epoch(on_step)
            metrics = {"epoch": self.epoch, "train_loss": train_loss, **self.val_metrics()}
            metrics["seconds"] = time.perf_counter() - t0
            metrics["pairs_per_s"] = len(self.train) / metrics["seconds"]
            vl = metrics.get("val_loss")
            if vl is None or vl < self.best["val_loss"] - 1e-6:
                self.best = {"val_loss": math.inf if vl is None else vl, "epoch": self.epoch,
                             "image_anchors": self.img_a.detach().cpu().clone(),
                             "text_anchors": self.txt_a.detach().cpu().clone()}  # fmt: skip
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            self.history.append(metrics)
            self.epoch += 1
            if log:
                log(metrics)
            if checkpoint is not None and (self.dp is None or self.dp.main):
                _atomic_torch_save(self.state(), checkpoint)
        model = PAL(self.cfg)
        model.load_state_dict({"image_anchors": self.best["image_anchors"], "text_anchors": self.best["text_anchors"]})
        return model


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- the command ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignConfig:
    """One `pipe align` invocation; persisted in run.json."""

    shards: str
    out: str
    method: str = "pal"
    image_encoder: str | None = None
    text_encoder: str | None = None
    device: str = "auto"
    memory_budget: int | None = None  # bytes; default half the free memory of the device
    resume: bool = False
    limit: int | None = None  # use only the first N pairs (quick runs)
    unpaired_shards: str | None = None
    params: tuple[tuple[str, Any], ...] = ()  # the method's hyper-parameters (its Config fields)


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


def run_align(cfg: AlignConfig, progress: bool = True) -> Path:
    """Train (or resume, or skip when finished) and write the run dir; returns its path."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PipeError(f"--out {out}: is a file")
    run_json = out / "run.json"
    mcfg = method_config(cfg.method, dict(cfg.params))
    if cfg.limit is not None and cfg.limit < 2:
        raise PipeError(f"--limit must be >= 2 pairs, got {cfg.limit}")
    if cfg.memory_budget is not None and cfg.memory_budget < 0:
        raise PipeError(f"--memory-budget must be >= 0, got {cfg.memory_budget}")
    if run_json.exists():
        prev = json.loads(run_json.read_text())
        same = (prev.get("config") == asdict(mcfg) and prev.get("method") == cfg.method
                and _data_key(prev.get("align", {})) == _data_key(asdict(cfg)))  # fmt: skip
        if prev.get("complete") and same:
            return out  # already trained with these settings on this data
        if prev.get("complete"):
            raise PipeError(f"--out {out}: holds a finished run with other settings or data; choose another --out")
        if not same and (out / "checkpoint.pt").exists():
            raise PipeError(f"--out {out}: its checkpoint is from other settings or data; choose another --out")
    device = resolve_device(cfg.device)
    keep_freed_host_memory()
    stores = find_pair_stores(cfg.shards, cfg.image_encoder, cfg.text_encoder)
    method = get_method(cfg.method)
    dp = None
    if launched_world() > 1:
        if method is not PAL:
            raise PipeError(f"--method {cfg.method}: data-parallel training (torchrun) is PAL's; run {cfg.method} "
                            "in one process (the baselines train in seconds)")  # fmt: skip
        dp, device = init_from_env(device)
    seed = getattr(mcfg, "seed", 0)
    val_fraction = getattr(mcfg, "val_fraction", 0.05)
    split = pair_split(stores, val_fraction, seed, cfg.limit)
    tokens = _wants_tokens(method, mcfg)
    use_cls = getattr(mcfg, "use_cls", False)

    def source(rows):
        return PairSource(stores, rows, split.captions, tokens=tokens, device=device,
                          memory_budget=cfg.memory_budget, use_cls=use_cls)  # fmt: skip

    train, val = source(split.train), (source(split.val) if len(split.val) >= 2 else None)
    out.mkdir(parents=True, exist_ok=True)
    meta = _run_meta(cfg, mcfg, stores, train, split) | {"data_parallel": dp.world if dp is not None else 1}
    t0 = time.perf_counter()
    history: list[dict] = []
    if isinstance(mcfg, PALConfig) and method is PAL:
        aligner, history = _train_pal(mcfg, train, val, device, out, cfg.resume, progress, meta, dp)
        if dp is not None and not dp.main:  # rank 0 writes the run
            barrier_and_close(dp)
            return out
    else:
        unpaired = _load_unpaired(cfg, stores) if cfg.unpaired_shards else None
        aligner = method.fit(train, val, mcfg, history.append, unpaired=unpaired)
    meta |= {"history": history, "wall_seconds": time.perf_counter() - t0, "complete": True}
    meta["heldout"] = heldout_metrics(aligner, val, getattr(mcfg, "seed", 0)) if val is not None else {}
    meta["best_epoch"] = _best_epoch(history)
    aligner.save(out)
    _plot_loss(history, out / "loss.png", cfg.method)
    run_json.write_text(json.dumps(meta, indent=2))
    (out / "checkpoint.pt").unlink(missing_ok=True)
    barrier_and_close(dp)
    return out


@torch.no_grad()
def heldout_metrics(aligner, val: PairSource, seed: int) -> dict[str, float]:
    """Retrieval R@1/R@5 on the held-out pairs (one caption per image), the same for every method: what a user (and
    the demo) can select hyper-parameters on without touching an evaluation split."""
    from pipe_align.align.retrieval import retrieval_metrics

    h_i, h_t = [], []
    for batch in val.batches(0, 1024, seed, shuffle=False):
        h_i.append(aligner.image_global(batch.image).float().cpu())
        h_t.append(aligner.text_global(batch.text).float().cpu())
    hi, ht = torch.cat(h_i), torch.cat(h_t)
    r = retrieval_metrics(hi, ht, torch.arange(len(ht)), ks=(1, 5))
    out = {f"heldout_{k}": v for k, v in r.items()}
    out["heldout_mean_r1"] = (r["text_retrieval_recall@1"] + r["image_retrieval_recall@1"]) / 2
    return out


def _data_key(align: dict) -> tuple:
    """What a run's data depends on: a finished or checkpointed run is reused only when these match."""
    return tuple(align.get(k) for k in ("shards", "image_encoder", "text_encoder", "limit", "unpaired_shards"))


def _wants_tokens(method, mcfg) -> bool:
    fn = getattr(method, "wants_tokens", None)
    return bool(fn(mcfg)) if callable(fn) else bool(method.needs_tokens)


def _best_epoch(history: list[dict]) -> int | None:
    vals = [(h["val_loss"], h["epoch"]) for h in history if "val_loss" in h]
    return min(vals)[1] if vals else (history[-1]["epoch"] if history else None)


def _run_meta(cfg: AlignConfig, mcfg, stores: PairStores, train: PairSource, split) -> dict[str, Any]:
    si, st = stores.image, stores.text
    return {
        "method": cfg.method, "config": asdict(mcfg), "align": asdict(cfg) | {"params": dict(cfg.params)},
        "image_encoder": si.layout.encoder.get("alias"), "text_encoder": st.layout.encoder.get("alias"),
        "image_weights": si.layout.encoder.get("weights"), "text_weights": st.layout.encoder.get("weights"),
        "image_layer": si.layout.encoder.get("layer"), "text_layer": st.layout.encoder.get("layer"),
        "dataset": si.layout.dataset, "split": si.layout.split,
        "image_store": str(si.path), "text_store": str(st.path),
        "fingerprint": {"image": store_fingerprint(si), "text": store_fingerprint(st)},
        "pairs": {"train": int(len(split.train)), "val": int(len(split.val))},
        "tokens": {"image": "patches+cls" if getattr(mcfg, "use_cls", False) else "patches"},
        "data_mode": "memory" if train.in_memory else "stream", "complete": False,
    }  # fmt: skip


def _train_pal(mcfg, train, val, device, out: Path, resume: bool, progress: bool, meta: dict, dp=None):
    trainer = Trainer(mcfg, train, val, device, dp)
    main = dp is None or dp.main
    progress = progress and main
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        if not resume:
            raise PipeError(f"--out {out}: has an unfinished run (checkpoint.pt); pass --resume to continue it")
        state = torch.load(ckpt, weights_only=False)
        if state.get("config") != asdict(mcfg):
            raise PipeError(f"{ckpt}: was trained with other options; resume with the same options or a new --out")
        trainer.load_state(state)
    if main:
        (out / "run.json").write_text(json.dumps(meta, indent=2))  # complete: false until the end
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    bar = Progress(*cols, TimeRemainingColumn(), disable=not progress)
    with bar:
        task = bar.add_task(f"pal epoch {trainer.epoch}", total=len(train), info="")
        t_epoch = [time.perf_counter(), 0]

        def on_step(n: int, loss: float) -> None:
            t_epoch[1] += n
            rate = t_epoch[1] / max(time.perf_counter() - t_epoch[0], 1e-9)
            bar.update(task, advance=n, info=f"loss {loss:.3f} {rate:.0f} pairs/s")

        def log(m: dict) -> None:
            t_epoch[0], t_epoch[1] = time.perf_counter(), 0
            bar.reset(task, description=f"pal epoch {m['epoch'] + 1}")
            if not progress:
                return
            bar.console.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))

        model = trainer.run(log=log, checkpoint=ckpt, on_step=on_step)
    return model, copy.deepcopy(trainer.history)


def _load_unpaired(cfg: AlignConfig, paired: PairStores):
    """Image rows and caption rows of `--unpaired-shards` (their pairing, if any, unused), from stores of the same
    encoders (alias and layer) as the paired ones: complete, skipped images dropped, every value finite."""
    from pipe_align.align.base import ImageRows, TextRows
    from pipe_align.align.data import _stores_in

    folder = Path(cfg.unpaired_shards)
    stores = _stores_in(folder)
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


def _plot_loss(history: list[dict], path: Path, method: str) -> None:
    if not history or not any(k in history[0] for k in ("train_loss", "val_loss")):
        return  # closed-form methods have no loss curve
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ep = [h["epoch"] for h in history]
    if "train_loss" in history[0]:
        ax.plot(ep, [h["train_loss"] for h in history], label="train")
    if "val_loss" in history[0]:
        ax.plot(ep, [h["val_loss"] for h in history], label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title(f"{method}: loss per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
