"""The one training loop: every trained method goes through it, closed-form methods fit directly (`fit`).

A trained method (`align.base.TrainedAligner`) supplies its parameters, its loss on a batch and its embed functions.
This loop owns the rest, the same for every method:
- the run config (`RunConfig`: seed, held-out fraction, epochs, batch size, patience, device, memory budget);
- AdamW with the method's rate, betas and weight decay; a cosine, periodic cosine or constant schedule with linear
  warm-up (per step); optionally an LR finder before the first epoch (`align.lr_finder`) whose pick replaces the rate;
- gradient clipping (the global norm, or each of the method's parameter groups on its own) and a stop on anything
  non-finite: loss, gradient norm or parameters (the last good checkpoint is kept);
- early stopping on the held-out pairs with one meaning of patience: stop after `patience` epochs without a better
  held-out loss, 0 = never stop early; the best epoch's state is what the run keeps;
- an atomic checkpoint after every epoch, from which `resume` continues bit-identically;
- data parallelism under torchrun (`align.ddp`): every rank walks the same batches, computes its part's per-row
  tensors, the loss is the whole batch's (gathered rows), and the parameter gradients are summed over ranks;
- progress: one plain line per epoch in the run's log file, a rich bar on the terminal (and the per-epoch lines too
  with `verbose`), one summary line at the end (where it stopped, the best epoch, why); `on_epoch` receives the
  history so far after every epoch.

The held-out loss is the same definition for every method: symmetric InfoNCE, at the method's `val_temperature`,
of `image_global` / `text_global` on the held-out pairs in batches of the run's batch size (epoch 0's caption draw),
with held-out R@1 both ways beside it.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_bytes

from .base import (
    Aligner,
    ClosedFormAligner,
    MethodConfig,
    StepContext,
    TrainedAligner,
    TrainingData,
    value_problem,
)
from .ddp import DataParallel, gather_rows, sum_gradients
from .losses import info_nce
from .lr_finder import find_lr
from .retrieval import retrieval_metrics

CAPTION_RULES = ("draw", "first")  # RunConfig.captions: a caption drawn per epoch, or each image's first (the authors')


class NonFinite(PipeError):
    """Training produced a NaN or infinity (loss, gradient or parameters); the last good checkpoint is kept."""


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings, the same fields for every method (persisted in run.json as "run"). `epochs`,
    `batch_size` and `patience` left at None take the method's own defaults (`TrainedAligner.run_defaults`)."""

    seed: int = field(default=0, metadata={"help": "Random seed: held-out split, initialisation, batch order."})
    val_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Held-out fraction of the training pairs, the same rows for every method (early stopping and "
            "held-out retrieval)."
        },
    )
    epochs: int | None = field(default=None, metadata={"help": "Maximum epochs (default: the method's)."})
    batch_size: int | None = field(default=None, metadata={"help": "Pairs per batch (default: the method's)."})
    patience: int | None = field(
        default=None,
        metadata={
            "help": "Early stopping: epochs without a better held-out loss before stopping; 0 = off (default: the "
            "method's)."
        },
    )
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    memory_budget: int | None = field(
        default=None,
        metadata={
            "help": "Keep training tokens in memory up to this size (e.g. 8G); default half the free memory of the "
            "device; above it, stream from Zarr.",
            "size": True,
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Use only the first N pairs."})
    captions: str = field(
        default="draw",
        metadata={
            "help": "The caption of each image in an epoch: draw (a different one each epoch, seeded) or first (the "
            "image's first caption in every epoch, as the PAL authors)."
        },
    )
    val_shards: str | None = field(
        default=None,
        metadata={
            "help": "Held-out pairs from another store set (a FEATURES/DATASET/SPLIT folder, e.g. COCO val2014) "
            "instead of a fraction of the training pairs: every training pair trains (needs --val-fraction 0)."
        },
    )

    # Inclusive bounds (docs/guarantees.md, "Security"): far above any real run (the PAL authors train up to 1000
    # epochs with patience 200 and batches of 4096 on 83k pairs), low enough that no value asks for a loop that
    # never ends or an allocation that cannot succeed.
    limits: ClassVar[dict[str, tuple[int | None, int]]] = {
        "seed": (0, 2**63 - 1),
        "epochs": (1, 100_000),
        "batch_size": (2, 1 << 24),
        "patience": (0, 100_000),
        "memory_budget": (0, 2**62 - 1),
        "limit": (2, 1 << 40),
    }

    def __post_init__(self) -> None:
        problem = value_problem(self)
        if problem is None and not 0 <= self.val_fraction < 1:
            problem = "val_fraction", "is out of range; allowed: from 0 to below 1"
        if problem is not None:
            name, what = problem
            raise PipeError(f"--{name.replace('_', '-')} {getattr(self, name)!r} {what}")
        self.check_heldout()

    def check_heldout(self) -> None:
        """The caption rule is a known one, and one source of held-out pairs is named, not two."""
        if self.captions not in CAPTION_RULES:
            raise PipeError(f"--captions must be one of {', '.join(CAPTION_RULES)}, got {self.captions!r}")
        if self.val_shards is not None and self.val_fraction > 0:
            raise PipeError(
                f"--val-shards {self.val_shards} holds the held-out pairs and --val-fraction "
                f"{self.val_fraction} would hold out training pairs too; give --val-fraction 0"
            )

    def resolved(self, method: type[Aligner]) -> RunConfig:
        """Unset epochs / batch_size / patience filled with the method's defaults (trained methods only)."""
        if not issubclass(method, TrainedAligner):
            return self
        return replace(self, **{k: v for k, v in method.run_defaults.items() if getattr(self, k) is None})

    def training_key(self) -> dict[str, Any]:
        """The fields a trained result depends on (not where or how the data is held). The caption rule and the
        held-out store set appear when they are not the defaults, so runs made before they existed keep their key."""
        key = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("device", "memory_budget")}
        if key["captions"] == "draw":
            del key["captions"]
        if key["val_shards"] is None:
            del key["val_shards"]
        else:
            key["val_shards"] = str(Path(key["val_shards"]).resolve())
        return key


@dataclass
class FitResult:
    aligner: Aligner
    history: list[dict[str, Any]]
    info: dict[str, Any]  # closed form: facts of the fit; trained: best epoch, why it stopped


def fit(
    method: type[Aligner],
    config: MethodConfig,
    run: RunConfig,
    data: TrainingData,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    key: dict[str, Any] | None = None,
    dp: DataParallel | None = None,
    on_epoch: Callable[[list[dict]], None] | None = None,
    progress: bool = False,
    log: Path | None = None,
    verbose: bool = False,
) -> FitResult:
    """Fit any method. Closed form: one call. Trained: `Trainer`, with a checkpoint per epoch when `checkpoint` is
    given (`key` identifies the run it belongs to; `resume` continues from it), per-epoch lines appended to `log`."""
    run = run.resolved(method)
    if issubclass(method, ClosedFormAligner):
        aligner, info = method.fit(data, config, run.seed)
        result = FitResult(aligner, [], info)
    else:
        trainer = Trainer(method, config, run, data, dp)
        if checkpoint is not None and checkpoint.exists():
            if not resume:
                raise PipeError(
                    f"{checkpoint.parent}: has an unfinished run (checkpoint.pt); pass --resume to continue it"
                )
            trainer.load_checkpoint(checkpoint, key)
        result = trainer.run(
            checkpoint=checkpoint, key=key, on_epoch=on_epoch, progress=progress, log=log, verbose=verbose
        )
    for name, t in result.aligner.state_dict().items():  # nothing non-finite is ever saved as a result
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFinite(
                f"{method.name}: the fitted {name!r} is not finite ({len(data.train)} training pairs; too "
                "few for this method or its settings?); nothing was saved"
            )
    return result


def lr_at(step: int, total: int, warmup: int, base: float, schedule: str, period: int = 1) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero over the rest, a constant rate, or (cosine_cycle)
    base * (1 + cos(pi t / period)) / 2 for every t, falling to zero at `period` steps and rising back (torch's
    CosineAnnealingLR, which the PAL authors step per batch for all their epochs)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    if schedule == "cosine_cycle":
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, period)))
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(
        self,
        method: type[TrainedAligner],
        config: MethodConfig,
        run: RunConfig,
        data: TrainingData,
        dp: DataParallel | None = None,
    ) -> None:
        self.run_cfg, self.data, self.dp = run, data, dp
        self.method = method(config)
        self.method.setup(data, run.seed)
        self.params = list(self.method.parameters())  # registration order: the checkpoint's "params" list
        cfg = self.method.config
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
        )
        self.steps_per_epoch = max(1, math.ceil(self.method.epoch_rows(data) / run.batch_size))
        self.total_steps = self.steps_per_epoch * run.epochs
        self.warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        # the authors' CosineAnnealingLR: T_max = cycle epochs x max(1, pairs // batch) steps (floor, as theirs)
        self.period = max(1, round(cfg.cycle_epochs * max(1, self.method.epoch_rows(data) // run.batch_size)))
        self.groups = self.method.param_groups()
        self.lr_finder: dict[str, Any] | None = None  # the finder's record once it ran (kept in the checkpoint)
        self.epoch, self.step, self.bad_epochs = 0, 0, 0
        self.best: dict[str, Any] = {"val_loss": math.inf, "epoch": -1, "state": None}
        self.history: list[dict[str, Any]] = []
        self.init_metrics: dict[str, float] = {}
        if method.init_is_candidate and data.val is not None:
            self.init_metrics = self.validate()
            if "val_loss" in self.init_metrics:
                self.best = {"val_loss": self.init_metrics["val_loss"], "epoch": -1, "state": self._snapshot()}

    def _snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.method.state_dict().items()}

    def _gather(self, t: Tensor, sizes: tuple[int, ...] | None) -> Tensor:
        return t if self.dp is None else gather_rows(t, sizes, self.dp)

    # -- one epoch ------------------------------------------------------------------------------------------------
    def train_epoch(self, on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
        cfg, run = self.method.config, self.run_cfg
        sums: dict[str, float] = {}
        n = 0
        part = self.dp.part if self.dp is not None else None
        min_rows = max(2, self.dp.world if self.dp is not None else 1)  # negatives, and a row for every rank
        for batch in self.method.batches(self.data, self.epoch, run.batch_size, run.seed, part):
            if batch.total < min_rows:
                continue
            lr = lr_at(self.step, self.total_steps, self.warmup, self.base_lr, cfg.schedule, self.period)
            for g in self.opt.param_groups:
                g["lr"] = lr
            ctx = StepContext(self.epoch, self.step, self.steps_per_epoch, self._gather)
            loss, extras = self.method.loss(batch, ctx)
            where = f"at epoch {self.epoch} step {self.step}"
            if not torch.isfinite(loss):
                raise NonFinite(
                    f"loss is {loss.item()} {where}; training stopped, the last good checkpoint is kept "
                    "(lower --lr or check the stores with `pipe verify`)"
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.dp is not None:
                sum_gradients(self.params)  # each rank's backward covers only its own rows
            norm = clip_gradients(self.groups, cfg.grad_clip, cfg.grad_clip_mode)
            if not math.isfinite(norm):
                raise NonFinite(
                    f"gradient norm is {norm} {where}; training stopped, the last good checkpoint is kept (lower --lr)"
                )
            self.opt.step()
            if not all(bool(torch.isfinite(p).all()) for p in self.params):
                raise NonFinite(
                    f"parameters became non-finite {where}; training stopped, the last good checkpoint "
                    "is kept (lower --lr)"
                )
            self.step += 1
            n += batch.total
            for k, v in {"train_loss": loss.item(), **extras}.items():
                sums[k] = sums.get(k, 0.0) + v * batch.total
            if on_step:
                on_step(batch.total, loss.item())
        if not n:
            return {"train_loss": math.nan}
        return {k: v / n for k, v in sums.items()} | {"lr": lr}  # the epoch's last rate

    @property
    def base_lr(self) -> float:
        """The peak rate: the LR finder's pick when it ran and could pick, else the configured one."""
        found = (self.lr_finder or {}).get("lr")
        return self.method.config.lr if found is None else found

    def find_lr(self) -> dict[str, Any]:
        """The LR finder on this run's batches (full-size ones of successive shuffled epochs, numbered after any
        training epoch), with the method's loss, under data parallelism like a training step."""
        cfg, run = self.method.config, self.run_cfg
        part = self.dp.part if self.dp is not None else None
        full = min(run.batch_size, self.method.epoch_rows(self.data))
        min_rows = max(2, self.dp.world if self.dp is not None else 1)

        def batches():
            if getattr(cfg, "lr_finder_draw", "epochs") == "subset" and finder_draws_apply(self.method, self.data):
                yield from finder_draws(self.data.train, run.batch_size, run.seed, part)
                return
            for e in range(1 << 20):
                for batch in self.method.batches(self.data, FINDER_EPOCHS + e, run.batch_size, run.seed, part):
                    if batch.total >= max(full, min_rows):
                        yield batch

        def loss_of(batch):
            ctx = StepContext(self.epoch, self.step, self.steps_per_epoch, self._gather, finder=True)
            return self.method.loss(batch, ctx)[0]

        after = (lambda: sum_gradients(self.params)) if self.dp is not None else None
        return find_lr(
            self.params,
            loss_of,
            batches(),
            iters=cfg.lr_finder,
            start=cfg.lr_finder_start,
            end=cfg.lr_finder_end,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            after_backward=after,
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out InfoNCE and R@1 both ways (empty without held-out pairs)."""
        return heldout_loss(self.method, self.data.val, self.run_cfg.batch_size, self.run_cfg.seed, self.step)

    # -- state ----------------------------------------------------------------------------------------------------
    def state(self, key: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "params": [p.detach().clone() for p in self.params],
            "opt": self.opt.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "bad_epochs": self.bad_epochs,
            "best": self.best,
            "history": self.history,
            "init_metrics": self.init_metrics,
            "lr_finder": self.lr_finder,
            "key": key,
        }

    def load_checkpoint(self, path: Path, key: dict[str, Any] | None) -> None:
        """weights_only: a checkpoint holds tensors, numbers, strings, lists and dicts, so torch's restricted unpickler
        reads it and a planted file that would build any other object (run code) is refused, not executed."""
        try:
            state = torch.load(path, map_location=self.params[0].device, weights_only=True)
            if not isinstance(state, dict):
                raise TypeError(type(state).__name__)
            params = state["params"]
        except Exception as e:  # truncated, corrupt, foreign or hostile file: one line, never a traceback
            what = type(e).__name__
            raise PipeError(f"{path}: cannot be read as a checkpoint ({what}); remove it to start over") from None
        if state.get("key") != key:
            raise PipeError(
                f"{path}: was written with other options or data; resume with the same ones, or use another --out"
            )
        if len(params) != len(self.params) or any(a.shape != b.shape for a, b in zip(params, self.params)):
            raise PipeError(
                f"{path}: parameter shapes {[tuple(p.shape) for p in params]} do not match this run's "
                f"{[tuple(p.shape) for p in self.params]}"
            )
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
        self.opt.load_state_dict(state["opt"])
        self.epoch, self.step, self.bad_epochs = state["epoch"], state["step"], state["bad_epochs"]
        self.best, self.history, self.init_metrics = state["best"], state["history"], state["init_metrics"]
        self.lr_finder = state.get("lr_finder")

    def finished(self) -> bool:
        patience = self.run_cfg.patience
        return self.epoch >= self.run_cfg.epochs or (patience > 0 and self.bad_epochs >= patience)

    def run(
        self,
        checkpoint: Path | None = None,
        key: dict[str, Any] | None = None,
        on_epoch: Callable[[list[dict]], None] | None = None,
        progress: bool = False,
        log: Path | None = None,
        verbose: bool = False,
    ) -> FitResult:
        main = self.dp is None or self.dp.main
        if self.method.config.lr_finder and self.lr_finder is None and self.step == 0:
            self.lr_finder = self.find_lr()
        bar, on_step, new_epoch, say = _progress_bar(
            self.method.name,
            self.method.epoch_rows(self.data),
            progress and main,
            self.epoch,
            log if main else None,
            verbose,
        )
        with bar:
            while not self.finished():
                t0 = time.perf_counter()
                metrics: dict[str, Any] = {"epoch": self.epoch, **self.train_epoch(on_step)}
                if self.epoch == 0 and self.init_metrics:
                    metrics |= {f"init_{k}": v for k, v in self.init_metrics.items()}
                metrics |= self.validate()
                metrics["seconds"] = time.perf_counter() - t0
                metrics["pairs_per_s"] = self.method.epoch_rows(self.data) / metrics["seconds"]
                vl = metrics.get("val_loss")
                if vl is None or vl < self.best["val_loss"] - 1e-6:
                    self.best = {
                        "val_loss": math.inf if vl is None else vl,
                        "epoch": self.epoch,
                        "state": self._snapshot(),
                    }
                    self.bad_epochs = 0
                else:
                    self.bad_epochs += 1
                self.history.append(metrics)
                self.epoch += 1
                if checkpoint is not None and main:
                    atomic_torch_save(self.state(key), checkpoint)
                new_epoch(metrics)
                if on_epoch:
                    on_epoch(list(self.history))
        if self.best["state"] is not None:
            self.method.load_state_dict(self.best["state"])
        stopped = "epochs" if self.epoch >= self.run_cfg.epochs else "patience"
        say(summary_line(self.method.name, self.epoch, self.best, stopped, self.run_cfg))
        info: dict[str, Any] = {"best_epoch": self.best["epoch"], "stopped": stopped, "lr": self.base_lr}
        if self.lr_finder is not None:
            info["lr_finder"] = self.lr_finder
        return FitResult(self.method, list(self.history), info)


FINDER_EPOCHS = 1 << 30  # the LR finder's batches are those of epochs numbered from here (never a training epoch's)
FINDER_SUBSET = 5000  # the authors' finder draws its batches from this many random training pairs


def finder_draws_apply(method: TrainedAligner, data: TrainingData) -> bool:
    """The authors' draws need a source that serves any rows (align.data.PairSource) and a method that trains on the
    plain paired batches (not SOTAlign's unpaired ones)."""
    return hasattr(data.train, "batch_of") and type(method).batches is TrainedAligner.batches


def finder_draws(train: Any, batch_size: int, seed: int, part: tuple[int, int] | None = None):
    """The LR finder's batches as the PAL authors draw them (base_trainer.py find_optimal_learning_rate): a random
    subset of min(N, 5000) training pairs once, then per iteration a random min(batch, subset) of that subset, each
    image with its caption of the finder's epoch. Seeded by the run's seed, so a resumed run draws the same."""
    gen = np.random.default_rng([seed, FINDER_EPOCHS])
    subset = gen.permutation(len(train))[: min(len(train), FINDER_SUBSET)]
    size = min(batch_size, len(subset))
    while True:
        yield train.batch_of(subset[gen.permutation(len(subset))[:size]], FINDER_EPOCHS, seed, part)


def clip_gradients(groups: list[list[Tensor]], clip: float, mode: str = "global") -> float:
    """Clip gradients in place and return the global norm before clipping. `global`: the norm of all gradients
    together is clipped to `clip` (torch's clip_grad_norm_); `per_group`: each group's norm on its own (the PAL
    authors' clip_gradients: coefficient clip / (norm + 1e-6) where below 1). `clip` 0: nothing is clipped."""
    params = [p for g in groups for p in g]
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip <= 0:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if mode == "global":
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    norms = [float(torch.nn.utils.clip_grad_norm_(g, clip)) for g in groups if any(p.grad is not None for p in g)]
    return math.sqrt(sum(n * n for n in norms))


@torch.no_grad()
def heldout_loss(
    aligner: Aligner, val: Any, batch_size: int, seed: int, steps_done: int | None = None
) -> dict[str, float]:
    """InfoNCE at the method's `val_temperature` and R@1 both ways on the held-out pairs (fixed epoch-0 batches).
    Given the training steps done, a method's regulariser at its weight then (`heldout_penalty`: the contrastive
    heads' lambda * STRUCTURE) is added, as the authors' validation loss is their training loss."""
    penalty = getattr(aligner, "heldout_penalty", None) if steps_done is not None else None
    if val is None or len(val) < 2:
        return {}
    losses, n, h_i, h_t = 0.0, 0, [], []
    for batch in val.batches(0, batch_size, seed, shuffle=False):
        if len(batch.rows) < 2:
            continue
        hi, ht = aligner.image_global(batch.image), aligner.text_global(batch.text)
        extra = penalty(batch, steps_done) if penalty is not None else 0.0
        losses += (info_nce(hi, ht, aligner.val_temperature).item() + extra) * len(batch.rows)
        n += len(batch.rows)
        h_i.append(hi.float().cpu())
        h_t.append(ht.float().cpu())
    if n == 0:
        return {}
    hi, ht = torch.cat(h_i), torch.cat(h_t)
    r = retrieval_metrics(hi, ht, torch.arange(len(ht)), ks=(1, 5))
    i2t, t2i = r["text_retrieval_recall@1"], r["image_retrieval_recall@1"]
    return {"val_loss": losses / n, "val_i2t_r1": i2t, "val_t2i_r1": t2i}


@torch.no_grad()
def heldout_retrieval(aligner: Aligner, val: Any, seed: int) -> dict[str, float]:
    """Retrieval R@1/R@5 on the held-out pairs (one caption per image), the same for every method: what a user (and
    the demo) can select hyper-parameters on without touching an evaluation split."""
    h_i, h_t = [], []
    for batch in val.batches(0, 1024, seed, shuffle=False):
        h_i.append(aligner.image_global(batch.image).float().cpu())
        h_t.append(aligner.text_global(batch.text).float().cpu())
    hi, ht = torch.cat(h_i), torch.cat(h_t)
    r = retrieval_metrics(hi, ht, torch.arange(len(ht)), ks=(1, 5))
    out = {f"heldout_{k}": v for k, v in r.items()}
    out["heldout_mean_r1"] = (r["text_retrieval_recall@1"] + r["image_retrieval_recall@1"]) / 2
    return out


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Serialised in memory first (a checkpoint is the parameters and the optimiser state: small), then written by
    `write_bytes`: a full disk is one line naming the file and the previous checkpoint stays whole."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def summary_line(name: str, epochs_run: int, best: dict[str, Any], stopped: str, run: RunConfig) -> str:
    """The one line a person reads after training: where it stopped, which epoch is kept, and why it stopped."""
    why = (
        f"reached --epochs {run.epochs}"
        if stopped == "epochs"
        else f"no better held-out loss for {run.patience} epochs (--patience)"
    )
    which = "the state before the first epoch" if best["epoch"] < 0 else f"best epoch {best['epoch']}"
    kept = (
        f"{which} (held-out loss {best['val_loss']:.4f}) kept"
        if math.isfinite(best["val_loss"])
        else f"no held-out pairs, epoch {best['epoch']} kept"
    )
    return f"{name}: stopped at epoch {epochs_run - 1}, {why}; {kept}"


def _append_line(path: Path, line: str) -> None:
    """One line appended to the run's log; never through a planted link (O_NOFOLLOW)."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _progress_bar(name: str, rows: int, enabled: bool, first_epoch: int, log: Path | None, verbose: bool):
    """Where training reports. The run's log file gets one plain line per epoch and the summary (`say`); the terminal
    (stderr, as extraction's progress; stdout keeps the result) gets a rich bar per epoch (rows, loss, pairs/s) when it
    is a terminal (a live bar would be redrawn into a file), the summary, and the per-epoch lines only with `verbose`
    (a demo's thousand epochs would bury its table)."""
    import contextlib
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    live = enabled and sys.stderr.isatty()
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    bar = Progress(*cols, TimeRemainingColumn(), disable=not live, console=Console(stderr=True))
    task = bar.add_task(f"{name} epoch {first_epoch}", total=rows, info="")
    clock = [time.perf_counter(), 0]

    def on_step(n: int, loss: float) -> None:
        clock[1] += n
        rate = clock[1] / max(time.perf_counter() - clock[0], 1e-9)
        bar.update(task, advance=n, info=f"loss {loss:.3f} {rate:.0f} pairs/s")

    def to_terminal(line: str) -> None:
        if live:
            bar.console.print(line, soft_wrap=True, markup=False, highlight=False)
        elif enabled:
            print(line, file=sys.stderr, flush=True)

    def new_epoch(m: dict) -> None:
        clock[0], clock[1] = time.perf_counter(), 0
        bar.reset(task, description=f"{name} epoch {m['epoch'] + 1}")
        line = f"{name} " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
        if log is not None:
            _append_line(log, line)
        if verbose:
            to_terminal(line)

    def say(line: str) -> None:
        if log is not None:
            _append_line(log, line)
        to_terminal(line)

    return (bar if live else contextlib.nullcontext()), on_step, new_epoch, say
