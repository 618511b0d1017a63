"""SOTAlign (Roschmann, Krzakala, Mazelet, Bouniot, Akata 2026, arXiv 2602.23353): a linear teacher from the pairs,
then alignment layers refined on unpaired rows with the KLOT divergence.

Stage 1 fits a closed-form linear teacher on the paired rows (`procrustes` or `cca`, option `teacher`). Stage 2
trains linear alignment layers f (image) and g (text), initialised to the teacher's maps, on batches of *unpaired*
images and texts: with K = f(X) g(Y)^T the student's cross-modal cosine affinity and K* the teacher's on the same
rows, the loss is KLOT(K, K*) = KL(P* || P), where P and P* are the entropic optimal transport plans (uniform
marginals) of the affinities, P = argmax_{P in U(a,b)} <P, K> + eps H(P). The relational structure of the teacher
is transferred without asking for a one-to-one match of unpaired rows.

The gradient is the paper's closed form (its Theorem 5.1, as in the authors' released `src/klot.py`):
dKL(P* || P(K)) / dK = (P - P*) / eps, evaluated at the converged plans, so nothing back-propagates through the
Sinkhorn iterations (`KLOT`, a custom autograd Function). The plans come from log-domain Sinkhorn with `n_iter`
iterations. Defaults follow the authors' KLOT module: eps (student) 0.05, eps_teacher 0.005, 100 iterations.

Not confirmed from the paper (its code is not released beyond `klot.py`): the learning rate, epochs and batch size of
stage 2 (ours: AdamW 1e-3 at a constant rate, 20 epochs, batch 1024), whether a paired loss is kept during stage 2
(ours: no), and the exact
input normalisation of the alignment layers (ours: the teacher's: centred and L2-normalised for procrustes, centred
for cca). Early stopping (align.loop) uses the held-out pairs' InfoNCE (temperature 0.05), with the teacher as the
first candidate, so the student is kept only where it beats the teacher there.
When `unpaired` is None the training rows are used with their pairing ignored: images and captions are drawn in
independent shuffles, so no batch contains known pairs on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipe_align.extract.errors import PipeError

from .base import (
    ImageRows,
    StepContext,
    TextRows,
    TrainedAligner,
    TrainedConfig,
    TrainingData,
    l2n,
    register_method,
    saved_size,
)
from .baseline import BaselineConfig, BaselineState, gather_pairs, image_input, text_input
from .cca import cca_fit
from .data import part_bounds
from .procrustes import procrustes_fit

TEACHERS = ("procrustes", "cca")


@dataclass(frozen=True)
class SOTAlignConfig(TrainedConfig, BaselineConfig):
    teacher: str = field(default="procrustes", metadata={"help": "sotalign: the stage-1 map, procrustes or cca."})
    teacher_dim: int | None = field(
        default=None,
        metadata={"help": "sotalign: the teacher's output dim (procrustes dim / cca rank; default theirs)."},
    )
    teacher_reg: float = field(default=1e-3, metadata={"help": "sotalign: ridge of a cca teacher."})
    eps: float = field(default=0.05, metadata={"help": "sotalign: entropic regularisation of the student's plans."})
    eps_teacher: float = field(
        default=0.005, metadata={"help": "sotalign: entropic regularisation of the teacher's plans."}
    )
    n_iter: int = field(default=100, metadata={"help": "sotalign: Sinkhorn iterations."})
    sinkhorn_symmetric: bool = field(
        default=True,
        metadata={
            "help": "sotalign: end Sinkhorn with the authors' averaged half-update (klot.py symmetric=True); false "
            "ends on the column update."
        },
    )
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (baselines)."})

    def check(self) -> None:
        super().check()
        if self.teacher not in TEACHERS:
            raise PipeError(f"teacher={self.teacher!r}; valid: {', '.join(TEACHERS)}")
        if self.eps <= 0 or self.eps_teacher <= 0 or self.n_iter < 1 or self.temperature <= 0:
            raise PipeError("eps, eps_teacher and temperature must be > 0 and n_iter >= 1")


def sinkhorn_log(logits: Tensor, n_iter: int, symmetric: bool = True) -> Tensor:
    """log of the entropic OT plan with uniform marginals for the Gibbs kernel exp(logits) (logits = K / eps).

    `n_iter` rounds of (row, column) log-domain updates; `symmetric` then does what the authors' `sinkhorn` in
    `src/klot.py` does by default: one more row and column update from the final potentials, each potential averaged
    with its update, so that neither marginal is exact and both are close (without it the column marginal is exact)."""
    n, m = logits.shape
    log_a, log_b = -math.log(n), -math.log(m)
    logits_t = logits.T.contiguous()  # column reductions as contiguous row reductions (about 2x faster on CPU)
    u = logits.new_zeros(n)
    v = logits.new_zeros(m)
    for _ in range(n_iter):
        u = log_a - torch.logsumexp(logits + v[None, :], dim=1)
        v = log_b - torch.logsumexp(logits_t + u[None, :], dim=1)
    if symmetric:
        u_extra = log_a - torch.logsumexp(logits + v[None, :], dim=1)
        v_extra = log_b - torch.logsumexp(logits_t + u[None, :], dim=1)
        u, v = 0.5 * (u + u_extra), 0.5 * (v + v_extra)
    return logits + u[:, None] + v[None, :]


def ot_plan(affinity: Tensor, eps: float, n_iter: int, symmetric: bool = True) -> Tensor:
    """Entropic OT plan of an affinity (cost = -affinity), no gradient."""
    with torch.no_grad():
        return sinkhorn_log(affinity / eps, n_iter, symmetric).exp()


class KLOT(torch.autograd.Function):
    """KL(P* || P(K)) with the closed-form gradient (P - P*) / eps w.r.t. the affinity K."""

    @staticmethod
    def forward(
        ctx: Any, affinity: Tensor, plan_target: Tensor, eps: float, n_iter: int, symmetric: bool = True
    ) -> Tensor:
        log_p = sinkhorn_log(affinity.detach() / eps, n_iter, symmetric)
        kl = (torch.xlogy(plan_target, plan_target) - plan_target * log_p).sum()
        ctx.save_for_backward(log_p.exp(), plan_target)
        ctx.eps = eps
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        plan, plan_target = ctx.saved_tensors
        return grad * (plan - plan_target) / ctx.eps, None, None, None, None


def klot(affinity: Tensor, plan_target: Tensor, eps: float, n_iter: int, symmetric: bool = True) -> Tensor:
    return KLOT.apply(affinity, plan_target, eps, n_iter, symmetric)


@dataclass
class UnpairedBatch:
    """One step of stage 2: image rows and text rows drawn independently (this rank's part of each), and the whole
    batch's rows of both (the teacher's plan is computed on all of them, identically on every rank)."""

    images: Tensor
    texts: Tensor
    all_images: Tensor
    all_texts: Tensor
    image_sizes: tuple[int, ...] | None
    text_sizes: tuple[int, ...] | None

    @property
    def total(self) -> int:
        return len(self.all_images)


@register_method("sotalign")
class SOTAlign(BaselineState, TrainedAligner):
    """Linear alignment layers, teacher-initialised, refined with KLOT on unpaired rows."""

    Config = SOTAlignConfig
    run_defaults = {"epochs": 20, "batch_size": 1024, "patience": 5}
    init_is_candidate = True  # the teacher, until a student epoch beats it on the held-out pairs

    @property
    def l2_input(self) -> bool:
        return self.config.teacher == "procrustes"

    @staticmethod
    def _teacher(x: Tensor, y: Tensor, cfg: SOTAlignConfig) -> dict[str, Tensor]:
        """Stage 1 as (means, image map, text map) applied by `linear_embed`-style pre + matmul."""
        if cfg.teacher == "procrustes":
            s = procrustes_fit(x, y, cfg.teacher_dim)
            return {
                "mean_img": s["mean_img"],
                "mean_txt": s["mean_txt"],
                "w_img": s["basis_img"] @ s["rotation"],
                "w_txt": s["basis_txt"],
            }
        s = cca_fit(x, y, cfg.teacher_reg, cfg.teacher_dim)
        return {"mean_img": s["mean_img"], "mean_txt": s["mean_txt"], "w_img": s["proj_img"], "w_txt": s["proj_txt"]}

    def set_maps(self, tensors: dict[str, Tensor]) -> None:
        """The input means as buffers, the maps (w_img, b_img, w_txt, b_txt, in this order) as the trained
        parameters."""
        self.set_buffers({k: tensors[k] for k in ("mean_img", "mean_txt")})
        for k in ("w_img", "b_img", "w_txt", "b_txt"):
            setattr(self, k, nn.Parameter(tensors[k]))

    @classmethod
    def blank(cls, config: SOTAlignConfig, shapes: dict[str, tuple[int, ...]]) -> SOTAlign:
        """The input dims and the teacher's output dim (its fitted rank) from the saved tensors."""
        di, dt, e = saved_size(shapes, "mean_img", 0), saved_size(shapes, "mean_txt", 0), saved_size(shapes, "b_img", 0)
        out = cls(config)
        out.set_maps(
            {
                "mean_img": torch.empty(di),
                "mean_txt": torch.empty(dt),
                "w_img": torch.empty(di, e),
                "b_img": torch.empty(e),
                "w_txt": torch.empty(dt, e),
                "b_txt": torch.empty(e),
            }
        )
        return out

    def _pre(self, z: Tensor, side: str) -> Tensor:
        z = z.float() - self._get(f"mean_{side}", z)
        return l2n(z) if self.l2_input else z

    def _map(self, pre: Tensor, side: str) -> Tensor:
        return l2n(pre @ self._get(f"w_{side}", pre) + self._get(f"b_{side}", pre))

    # -- training (align.loop drives it) ----------------------------------------------------------------------------
    def setup(self, data: TrainingData, seed: int) -> None:
        config = self.config
        x, y = gather_pairs(data.train, config.image_feature, seed)
        teacher = self._teacher(x, y, config)
        e = teacher["w_img"].shape[1]
        self.set_maps(teacher | {"b_img": x.new_zeros(e), "b_txt": x.new_zeros(e)})
        if data.unpaired is not None:
            ux, uy = image_input(data.unpaired[0], config.image_feature), text_input(data.unpaired[1])
        else:
            ux, uy = x, y  # pairing ignored: images and captions are shuffled independently in `batches`
        ux, uy = ux.to(x.device), uy.to(x.device)
        with torch.no_grad():  # the unpaired rows' inputs and the teacher's embeddings: fixed for the whole run
            self._px, self._py = self._pre(ux, "img"), self._pre(uy, "txt")
            self._tx, self._ty = self._map(self._px, "img"), self._map(self._py, "txt")

    def epoch_rows(self, data: TrainingData) -> int:
        return max(len(self._px), len(self._py))

    def batches(
        self, data: TrainingData, epoch: int, batch_size: int, seed: int, part: tuple[int, int] | None
    ) -> Iterator[UnpairedBatch]:
        nx, ny = len(self._px), len(self._py)
        bi, bt = min(batch_size, nx), min(batch_size, ny)
        rng = np.random.default_rng([seed, epoch, 3])
        perm_i, perm_t = rng.permutation(nx), rng.permutation(ny)
        for s in range(max(1, math.ceil(max(nx, ny) / batch_size))):
            ii, tt = perm_i[(s * bi + np.arange(bi)) % nx], perm_t[(s * bt + np.arange(bt)) % ny]
            lo_i, hi_i, sizes_i = part_bounds(len(ii), part)
            lo_t, hi_t, sizes_t = part_bounds(len(tt), part)
            dev = self._px.device
            yield UnpairedBatch(
                torch.as_tensor(ii[lo_i:hi_i], device=dev),
                torch.as_tensor(tt[lo_t:hi_t], device=dev),
                torch.as_tensor(ii, device=dev),
                torch.as_tensor(tt, device=dev),
                sizes_i,
                sizes_t,
            )

    def loss(self, batch: UnpairedBatch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        config = self.config
        plan_t = ot_plan(
            self._tx[batch.all_images] @ self._ty[batch.all_texts].T,
            config.eps_teacher,
            config.n_iter,
            config.sinkhorn_symmetric,
        )
        f = ctx.gather(self._map(self._px[batch.images], "img"), batch.image_sizes)
        g = ctx.gather(self._map(self._py[batch.texts], "txt"), batch.text_sizes)
        loss = klot(f @ g.T, plan_t, config.eps, config.n_iter, config.sinkhorn_symmetric)
        return loss, {"klot": loss.item()}

    @property
    def val_temperature(self) -> float:
        return self.config.temperature

    def image_global(self, rows: ImageRows) -> Tensor:
        return self.image_dense(image_input(rows, self.config.image_feature))

    def text_global(self, rows: TextRows) -> Tensor:
        with torch.no_grad():
            return self._map(self._pre(text_input(rows), "txt"), "txt")

    def image_dense(self, patches: Tensor) -> Tensor:
        with torch.no_grad():
            return self._map(self._pre(patches, "img"), "img")
