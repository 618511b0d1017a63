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
stage 2 (ours: AdamW 1e-3, 20 epochs, 1024), whether a paired loss is kept during stage 2 (ours: no), and the exact
input normalisation of the alignment layers (ours: the teacher's: centred and L2-normalised for procrustes, centred
for cca). Early stopping uses the paired val split's InfoNCE (temperature 0.05) when a val split is given.
When `unpaired` is None the training rows are used with their pairing ignored: images and captions are drawn in
independent shuffles, so no batch contains known pairs on purpose.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipe_align.align.base import ImageRows, TextRows, l2n, register_method
from pipe_align.align.cca import cca_fit
from pipe_align.align.contrastive import info_nce
from pipe_align.align.procrustes import (
    BaselineAligner,
    BaselineConfig,
    gather_pairs,
    image_input,
    procrustes_fit,
    text_input,
)
from pipe_align.extract.errors import PipeError

TEACHERS = ("procrustes", "cca")


@dataclass(frozen=True)
class SOTAlignConfig(BaselineConfig):
    """`teacher`: the stage-1 map; `teacher_dim`: its output dim (procrustes `dim` / cca `rank`, None = their
    default); `teacher_reg`: cca ridge. `eps` / `eps_teacher`: entropic regularisation of the student / teacher
    plans."""

    teacher: str = "procrustes"
    teacher_dim: int | None = None
    teacher_reg: float = 1e-3
    eps: float = 0.05
    eps_teacher: float = 0.005
    n_iter: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 20
    patience: int = 5
    batch_size: int = 1024
    temperature: float = 0.05  # of the val InfoNCE used for early stopping only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher not in TEACHERS:
            raise PipeError(f"teacher={self.teacher!r}; valid: {', '.join(TEACHERS)}")
        if self.eps <= 0 or self.eps_teacher <= 0 or min(self.n_iter, self.epochs, self.batch_size) < 1:
            raise PipeError("eps, eps_teacher must be > 0 and n_iter, epochs, batch_size >= 1")


def sinkhorn_log(logits: Tensor, n_iter: int) -> Tensor:
    """log of the entropic OT plan with uniform marginals for the Gibbs kernel exp(logits) (logits = K / eps)."""
    n, m = logits.shape
    log_a, log_b = -math.log(n), -math.log(m)
    logits_t = logits.T.contiguous()  # column reductions as contiguous row reductions (about 2x faster on CPU)
    u = logits.new_zeros(n)
    v = logits.new_zeros(m)
    for _ in range(n_iter):
        u = log_a - torch.logsumexp(logits + v[None, :], dim=1)
        v = log_b - torch.logsumexp(logits_t + u[None, :], dim=1)
    return logits + u[:, None] + v[None, :]


def ot_plan(affinity: Tensor, eps: float, n_iter: int) -> Tensor:
    """Entropic OT plan of an affinity (cost = -affinity), no gradient."""
    with torch.no_grad():
        return sinkhorn_log(affinity / eps, n_iter).exp()


class KLOT(torch.autograd.Function):
    """KL(P* || P(K)) with the closed-form gradient (P - P*) / eps w.r.t. the affinity K."""

    @staticmethod
    def forward(ctx: Any, affinity: Tensor, plan_target: Tensor, eps: float, n_iter: int) -> Tensor:
        log_p = sinkhorn_log(affinity.detach() / eps, n_iter)
        kl = (torch.xlogy(plan_target, plan_target) - plan_target * log_p).sum()
        ctx.save_for_backward(log_p.exp(), plan_target)
        ctx.eps = eps
        return kl

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        plan, plan_target = ctx.saved_tensors
        return grad * (plan - plan_target) / ctx.eps, None, None, None


def klot(affinity: Tensor, plan_target: Tensor, eps: float, n_iter: int) -> Tensor:
    return KLOT.apply(affinity, plan_target, eps, n_iter)


@register_method("sotalign")
class SOTAlign(BaselineAligner):
    """Linear alignment layers, teacher-initialised, refined with KLOT on unpaired rows."""

    Config = SOTAlignConfig

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

    def _pre(self, z: Tensor, side: str) -> Tensor:
        z = z.float() - self._get(f"mean_{side}", z)
        return l2n(z) if self.l2_input else z

    def _map(self, pre: Tensor, side: str, params: dict[str, Tensor] | None = None) -> Tensor:
        p = self.state if params is None else params
        return l2n(pre @ p[f"w_{side}"].to(pre.device) + p[f"b_{side}"].to(pre.device))

    @classmethod
    def fit(
        cls, train: Any, val: Any | None, config: SOTAlignConfig, log: Callable[[dict], None],
        unpaired: tuple[ImageRows, TextRows] | None = None,
    ) -> SOTAlign:  # fmt: skip
        self = cls(config)
        x, y = gather_pairs(train, config.image_feature, config.seed)
        teacher = self._teacher(x, y, config)
        e = teacher["w_img"].shape[1]
        self.state = teacher | {"b_img": x.new_zeros(e), "b_txt": x.new_zeros(e)}
        if unpaired is not None:
            ux, uy = image_input(unpaired[0], config.image_feature), text_input(unpaired[1])
        else:
            ux, uy = x, y  # pairing ignored: images and captions are shuffled independently below
        ux, uy = ux.to(x.device), uy.to(x.device)
        px, py = self._pre(ux, "img"), self._pre(uy, "txt")
        tx, ty = self._map(px, "img"), self._map(py, "txt")  # teacher embeddings (the state is the teacher now)
        params = {k: v.clone().requires_grad_(k.startswith(("w_", "b_"))) for k, v in self.state.items()}
        opt = torch.optim.AdamW(
            [v for k, v in params.items() if v.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        nx, ny = len(px), len(py)
        bi, bt = min(config.batch_size, nx), min(config.batch_size, ny)
        steps = max(1, math.ceil(max(nx, ny) / config.batch_size))
        best_state, bad = copy.deepcopy(self.state), 0  # the teacher, until a student epoch beats it on val
        teacher_val = best = self._val_loss(val) if val is not None else math.inf
        for epoch in range(config.epochs):
            rng = np.random.default_rng([config.seed, epoch, 3])
            perm_i, perm_t = rng.permutation(nx), rng.permutation(ny)
            total = 0.0
            for s in range(steps):
                ii = torch.as_tensor(perm_i[(s * bi + np.arange(bi)) % nx], device=px.device)
                tt = torch.as_tensor(perm_t[(s * bt + np.arange(bt)) % ny], device=py.device)
                plan_t = ot_plan(tx[ii] @ ty[tt].T, config.eps_teacher, config.n_iter)
                k = self._map(px[ii], "img", params) @ self._map(py[tt], "txt", params).T
                loss = klot(k, plan_t, config.eps, config.n_iter)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            self.state = {k: v.detach().clone() for k, v in params.items()}
            record: dict[str, Any] = {"epoch": epoch, "klot": total / steps}
            if epoch == 0 and val is not None:
                record["teacher_val_loss"] = teacher_val
            if val is not None:
                record["val_loss"] = self._val_loss(val)
                if record["val_loss"] < best - 1e-6:
                    best, bad, best_state = record["val_loss"], 0, copy.deepcopy(self.state)
                else:
                    bad += 1
            log(record)
            if val is not None and bad >= config.patience:
                break
        if val is not None:
            self.state = best_state
        return self

    def _val_loss(self, val: Any) -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for b in val.batches(epoch=0, batch_size=self.config.batch_size, seed=self.config.seed, shuffle=False):
                hi, ht = self.image_global(b.image), self.text_global(b.text)
                total += float(info_nce(hi, ht, self.config.temperature)) * len(hi)
                n += len(hi)
        return total / max(n, 1)

    def image_global(self, rows: ImageRows) -> Tensor:
        return self.image_dense(image_input(rows, self.config.image_feature))

    def text_global(self, rows: TextRows) -> Tensor:
        with torch.no_grad():
            return self._map(self._pre(text_input(rows), "txt"), "txt")

    def image_dense(self, patches: Tensor) -> Tensor:
        with torch.no_grad():
            return self._map(self._pre(patches, "img"), "img")
