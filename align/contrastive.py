"""Contrastive heads on frozen features (`linear`, `mlp`), with the optional STRUCTURE regulariser.

One head per modality maps the frozen features into a shared E-dim space; the heads are trained with the symmetric
InfoNCE loss (CLIP's) on L2-normalised outputs at a fixed temperature. By default everything is what the STRUCTURE
authors' code does (Groeger, Wen, Le, Brbic, NeurIPS 2025, "With limited data for multimodal alignment, let the
STRUCTURE guide you"; the PAL authors' copy, `src/models/alignment/{linear,mlp}.py`, `src/training/loss/clip_loss.py`,
`configs/default.yaml`, `configs/mlp/*/mlp_d512_struct.yaml`):
- `linear`: `nn.Linear(D, E)` (LinearAlignmentLayer). `mlp`: their "MLP", `ResLowRankHead`: z = P x + alpha * W2
  dropout(GELU(W1 x)), P orthogonal (no bias), W1 orthogonal [rank x D], W2 zero, gate alpha = sigmoid(logit) with
  logit = -inf for their gate_init 0, rank 64, dropout 0.1. With gate_init 0 the gate and the residual never receive a
  gradient (sigmoid'(-inf) = 0, W2 stays 0), so the head stays the linear map P x; we keep that gate fixed at 0
  rather than store an infinite parameter. `head="gelu"` is our former Linear-GELU-Linear (`hidden` wide).
- inputs as stored (raw, uncentred); `normalize_inputs` (L2) and `center` (subtract the training mean) are ours.
- AdamW betas (0.9, 0.95), weight decay 1e-4, lr 1e-3 replaced by the LR finder's pick (100 iterations, 1e-7 to
  10), periodic cosine (torch's CosineAnnealingLR, T_max = 50 epochs of steps), every parameter tensor's gradient
  norm clipped to 1.0 on its own (TrainedConfig fields and `param_groups`).
- STRUCTURE: lambda ramps linearly from 0 over `structure_warmup_steps` (1000) optimiser steps, lambda(step) =
  structure_weight * min(1, step / warmup), step counted from 0 as in their `CLIPLoss.step()`.

`pool="token"` projects every token with the head and mean-pools the valid tokens (image patches / word tokens),
the token-level counterpart of the global heads; it needs the token arrays (`wants_tokens`). For a linear head that
equals projecting the mean token; for the GELU MLP it does not, and it needs many more optimiser steps than the
global one: with a few hundred pairs use a small `batch_size` (one step per epoch barely moves it).

STRUCTURE adds lambda * mean over modalities of a divergence between in-batch neighbourhood distributions of the
frozen input features and of the aligned outputs: each side L2-normalised then mean-centred over the batch,
similarities / temperature, row softmax, the divergence per row averaged over the batch (levels > 1 also compares
powers of the row-stochastic matrices, i.e. multi-step neighbourhoods, weighted equally). The divergence is their
code's, 1/2 [KL(M || A) + KL(M || O)] (`structure_divergence="reference"`, the default); the textbook Jensen-Shannon
divergence, 1/2 [KL(A || M) + KL(O || M)], is the named variant `structure_divergence="js"`.

Each epoch draws a new caption per image (the PairSource's epoch-seeded draw). Early stopping watches the val InfoNCE
(no regulariser) and keeps the best epoch's weights. Training is deterministic given `seed` on a given device (the
dropout masks of a trainable residual come from a generator seeded by the run's seed and the step).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
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
from .baseline import BaselineConfig, image_input, text_input
from .losses import info_nce

POOLS = ("global", "token")
DIVERGENCES = ("reference", "js")
HEADS = ("reslowrank", "gelu")


@dataclass(frozen=True)
class LinearConfig(TrainedConfig, BaselineConfig):
    """Hyper-parameters of the contrastive heads (defaults: the STRUCTURE authors' code)."""

    # The STRUCTURE code's optimiser (help text: TrainedConfig's): AdamW (0.9, 0.95), its LR finder, the periodic
    # per-batch cosine, and each parameter tensor's gradient clipped on its own.
    beta2: float = 0.95
    schedule: str = "cosine_cycle"
    grad_clip: float = 1.0
    grad_clip_mode: str = "per_group"
    lr_finder: int = 100
    lr_finder_draw: str = "subset"
    pool: str = field(
        default="global",
        metadata={
            "help": "linear, mlp: global (project the global feature) or token (project every token, mean-pool)."
        },
    )
    dim: int = field(default=512, metadata={"help": "linear, mlp: output dimension of the heads."})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (baselines)."})
    structure_weight: float = field(
        default=0.0,
        metadata={"help": "linear, mlp: STRUCTURE regulariser weight lambda; 0 = off (the STRUCTURE paper uses 10)."},
    )
    structure_warmup_steps: int = field(
        default=1000,
        metadata={"help": "linear, mlp: optimiser steps of linear warm-up of lambda (the STRUCTURE code: 1000)."},
    )
    structure_temperature: float = field(default=0.05, metadata={"help": "linear, mlp: STRUCTURE temperature."})
    structure_levels: int = field(default=1, metadata={"help": "linear, mlp: STRUCTURE neighbourhood levels."})
    structure_divergence: str = field(
        default="reference",
        metadata={"help": "linear, mlp: reference (the STRUCTURE code's 1/2[KL(M||A)+KL(M||O)]) or js (textbook JS)."},
    )
    normalize_inputs: bool = field(
        default=False,
        metadata={
            "help": "linear, mlp: L2-normalise the frozen features before the head (ours; the STRUCTURE code feeds "
            "them as stored)."
        },
    )
    center: bool = field(
        default=False,
        metadata={"help": "linear, mlp: subtract the training mean of the (normalised) inputs before the head (ours)."},
    )

    def check(self) -> None:
        super().check()
        if self.pool not in POOLS:
            raise PipeError(f"pool={self.pool!r}; valid: {', '.join(POOLS)}")
        if self.structure_divergence not in DIVERGENCES:
            raise PipeError(f"structure_divergence={self.structure_divergence!r}; valid: {', '.join(DIVERGENCES)}")
        if min(self.dim, self.structure_levels) < 1:
            raise PipeError("dim and structure_levels must be >= 1")
        if self.temperature <= 0 or self.structure_temperature <= 0:
            raise PipeError("temperatures must be > 0")
        if self.structure_weight < 0 or self.structure_warmup_steps < 0:
            raise PipeError("structure_weight and structure_warmup_steps must be >= 0")


@dataclass(frozen=True)
class MLPConfig(LinearConfig):
    head: str = field(
        default="reslowrank",
        metadata={
            "help": "mlp: reslowrank (the STRUCTURE code's residual low-rank head) or gelu (Linear-GELU-Linear, ours)."
        },
    )
    rank: int = field(default=64, metadata={"help": "mlp: bottleneck width of the reslowrank residual."})
    dropout: float = field(default=0.1, metadata={"help": "mlp: dropout on the reslowrank residual (training only)."})
    gate_init: float = field(
        default=0.0,
        metadata={
            "help": "mlp: initial residual gate alpha of reslowrank in [0, 1); 0 = residual off for good (theirs)."
        },
    )
    hidden: int = field(default=1024, metadata={"help": "mlp: hidden width of the gelu head."})

    def check(self) -> None:
        super().check()
        if self.head not in HEADS:
            raise PipeError(f"head={self.head!r}; valid: {', '.join(HEADS)}")
        if min(self.hidden, self.rank) < 1:
            raise PipeError("hidden and rank must be >= 1")
        if not (0 <= self.dropout < 1 and 0 <= self.gate_init < 1):
            raise PipeError("dropout and gate_init must be in [0, 1)")


def _neighbourhoods(z: Tensor, temperature: float) -> Tensor:
    z = l2n(z)
    z = z - z.mean(0, keepdim=True)
    return torch.softmax(z @ z.T / temperature, dim=-1)


def neighbourhood_divergence(p: Tensor, q: Tensor, kind: str = "reference", eps: float = 1e-12) -> Tensor:
    """Mean over rows of the divergence between row distributions p and q, with m = (p + q) / 2:
    "reference" (the STRUCTURE authors' code): 1/2 [KL(m || p) + KL(m || q)];
    "js" (the textbook Jensen-Shannon divergence): 1/2 [KL(p || m) + KL(q || m)]."""
    m = 0.5 * (p + q)
    log_p, log_q, log_m = (p + eps).log(), (q + eps).log(), (m + eps).log()
    if kind == "reference":
        rows = 0.5 * ((m * (log_m - log_p)).sum(-1) + (m * (log_m - log_q)).sum(-1))
    else:
        rows = 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1))
    return rows.mean()


def structure_loss(
    original: Tensor, aligned: Tensor, temperature: float, levels: int = 1, divergence: str = "reference"
) -> Tensor:
    """STRUCTURE divergence between the batch neighbourhoods of frozen features and of aligned outputs."""
    po, pa = _neighbourhoods(original.detach(), temperature), _neighbourhoods(aligned, temperature)
    total = original.new_zeros(())
    for level in range(1, levels + 1):
        pl, ql = torch.linalg.matrix_power(po, level), torch.linalg.matrix_power(pa, level)
        total = total + neighbourhood_divergence(pl, ql, divergence)
    return total / levels


class ResLowRankHead(nn.Module):
    """The STRUCTURE code's residual low-rank head: P x + alpha * W2 dropout(GELU(W1 x)), alpha = sigmoid(logit).

    P and W1 orthogonal and bias-free, W2 zero. A gate_init of 0 is their logit -inf: alpha is 0 and never moves
    (no gradient reaches it or W2), kept here as a fixed zero buffer `gate`; a positive gate_init trains `gate_logit`.
    Dropout acts in training only, drawing from the generator passed to `forward` (none: no dropout)."""

    def __init__(self, din: int, dim: int, rank: int, dropout: float, gate_init: float) -> None:
        super().__init__()
        self.P = nn.Linear(din, dim, bias=False)
        self.W1 = nn.Linear(din, rank, bias=False)
        self.W2 = nn.Linear(rank, dim, bias=False)
        nn.init.orthogonal_(self.P.weight)
        nn.init.orthogonal_(self.W1.weight)
        nn.init.zeros_(self.W2.weight)
        self.p = dropout
        if gate_init > 0:
            self.gate_logit = nn.Parameter(torch.tensor(math.log(gate_init / (1 - gate_init))))
        else:
            self.register_buffer("gate", torch.zeros(()))

    @property
    def alpha(self) -> Tensor:
        return torch.sigmoid(self.gate_logit) if hasattr(self, "gate_logit") else self.gate

    def forward(self, z: Tensor, gen: torch.Generator | None = None, part: tuple[int, int] | None = None) -> Tensor:
        """`part` = (offset, total): these rows start at `offset` of a batch of `total` rows split over data-parallel
        ranks; the masks are drawn for the whole batch and sliced, so the ranks together use the masks one process
        would."""
        h = F.gelu(self.W1(z))
        if gen is not None and self.p > 0:
            offset, total = part if part is not None else (0, len(h))
            draw = torch.rand((total, *h.shape[1:]), generator=gen, device=h.device)
            keep = draw[offset : offset + len(h)] >= self.p
            h = h * keep / (1 - self.p)
        return self.P(z) + self.alpha * self.W2(h)


class ContrastiveHeads(TrainedAligner):
    """Two heads trained with InfoNCE (+ STRUCTURE); a subclass builds the head (`make_head`), everything else is
    shared. The module holds the heads as `img` and `txt` and the input centres as buffers `center_img`,
    `center_txt` (zeros when config.center is False)."""

    Config = LinearConfig
    run_defaults = {"epochs": 50, "batch_size": 1024, "patience": 5}

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        self.needs_tokens = self.wants_tokens(config)

    @abc.abstractmethod
    def make_head(self, din: int) -> nn.Module:
        """A head from `din` input features to `config.dim`, initialised from torch's global RNG (seeded by
        `build`)."""

    def build(self, image_dim: int, text_dim: int, seed: int = 0, device: str | torch.device = "cpu") -> None:
        """Both heads, drawn from `seed` (image head first), and zero input centres."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.img = self.make_head(image_dim).to(device)
            self.txt = self.make_head(text_dim).to(device)
        self.register_buffer("center_img", torch.zeros(image_dim, device=device))
        self.register_buffer("center_txt", torch.zeros(text_dim, device=device))

    @classmethod
    def blank(cls, config: LinearConfig, shapes: dict[str, tuple[int, ...]]) -> ContrastiveHeads:
        """Head widths from the config, input dims from the saved centres (the config does not know them)."""
        out = cls(config)
        out.build(saved_size(shapes, "center_img", 0), saved_size(shapes, "center_txt", 0))
        return out

    @classmethod
    def wants_tokens(cls, config: LinearConfig) -> bool:
        return config.image_feature == "mean" or config.pool == "token"

    @classmethod
    def config_from_dict(cls, config: dict[str, Any]) -> LinearConfig:
        """A method.json written before 2026-11-30 has no `normalize_inputs`: its weights were trained with the
        definitions of then (normalised, centred inputs; the GELU head), so those are what it loads with."""
        if "normalize_inputs" not in config:
            config = {"normalize_inputs": True, "center": True, "head": "gelu"} | config
        return super().config_from_dict(config)

    # -- inputs and encoders ------------------------------------------------------------------------------------------
    def _prep(self, z: Tensor) -> Tensor:
        return l2n(z) if self.config.normalize_inputs else z.float()

    def _image_tokens(self, rows: ImageRows) -> Tensor:
        """The frozen input the image head sees (before centring): [N, D] or [N, P, D] tokens."""
        if self.config.pool == "token":
            if rows.patches is None:
                raise PipeError("pool='token' needs the patch tokens (wants_tokens(config) is True)")
            return self._prep(rows.patches)  # [N, P, D]
        return self._prep(image_input(rows, self.config.image_feature))  # [N, D]

    def _text_tokens(self, rows: TextRows) -> tuple[Tensor, Tensor | None]:
        """The frozen input of the text head and its token mask (None for a global input)."""
        if self.config.pool == "token":
            if rows.tokens is None:
                raise PipeError("pool='token' needs the word tokens (wants_tokens(config) is True)")
            return self._prep(rows.tokens), rows.mask()
        return self._prep(text_input(rows)), None

    @staticmethod
    def _pool(h: Tensor, mask: Tensor | None) -> Tensor:
        """Mean over the token axis (valid tokens only); a global input [N, *] passes through."""
        if h.dim() == 2:
            return h
        if mask is None:
            return h.mean(1)
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def _head_out(
        self, side: str, z: Tensor, gen: torch.Generator | None = None, part: tuple[int, int] | None = None
    ) -> Tensor:
        """The head of `side` on centred inputs (token-wise: the last dim is the feature dim); `gen` draws the
        dropout masks of a residual head in training."""
        head = (self.img if side == "img" else self.txt).to(z.device)
        z = z - (self.center_img if side == "img" else self.center_txt).to(z.device)
        return head(z, gen, part) if isinstance(head, ResLowRankHead) else head(z)

    def _encode(
        self,
        image: ImageRows,
        text: TextRows,
        gen: torch.Generator | None = None,
        part: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image out, text out, image frozen input, text frozen input), outputs L2-normalised, inputs pooled; `part`:
        where these rows sit in the whole batch (`ResLowRankHead.forward`)."""
        zi = self._image_tokens(image)
        zt, mask = self._text_tokens(text)
        hi = l2n(self._pool(self._head_out("img", zi, gen, part), None))
        ht = l2n(self._pool(self._head_out("txt", zt, gen, part), mask))
        return hi, ht, self._pool(zi, None), self._pool(zt, mask)

    def image_global(self, rows: ImageRows) -> Tensor:
        with torch.no_grad():
            return l2n(self._pool(self._head_out("img", self._image_tokens(rows)), None))

    def text_global(self, rows: TextRows) -> Tensor:
        with torch.no_grad():
            zt, mask = self._text_tokens(rows)
            return l2n(self._pool(self._head_out("txt", zt), mask))

    def image_dense(self, patches: Tensor) -> Tensor:
        with torch.no_grad():
            return l2n(self._head_out("img", self._prep(patches)))

    def _centres(self, train: Any, seed: int) -> tuple[Tensor, Tensor]:
        """Mean input token (or global feature) of each side over the training pairs (epoch-0 captions), for
        `center`: without it a GELU MLP on tokens starts with pooled outputs dominated by the tokens' shared
        direction."""
        si = st = None
        ni = nt = 0
        for b in train.batches(epoch=0, batch_size=1024, seed=seed, shuffle=False):
            zi = self._image_tokens(b.image)
            zi = zi.reshape(-1, zi.shape[-1])
            zt, mask = self._text_tokens(b.text)
            zt = zt[mask] if mask is not None else zt
            si = zi.sum(0) if si is None else si + zi.sum(0)
            st = zt.sum(0) if st is None else st + zt.sum(0)
            ni, nt = ni + len(zi), nt + len(zt)
        return si / max(ni, 1), st / max(nt, 1)

    # -- training (align.loop drives it) ------------------------------------------------------------------------------
    def setup(self, data: TrainingData, seed: int) -> None:
        first = next(iter(data.train.batches(epoch=0, batch_size=2, seed=seed, shuffle=False)))
        di = self._image_tokens(first.image).shape[-1]
        dt = self._text_tokens(first.text)[0].shape[-1]
        self.build(di, dt, seed, first.image.cls.device)
        if self.config.center:
            self.center_img, self.center_txt = self._centres(data.train, seed)
        self._seed = seed

    def param_groups(self) -> list[list[Tensor]]:
        """Every parameter tensor on its own: the STRUCTURE code's `clip_gradients` clips each one's norm."""
        return [[p] for p in self.parameters()]

    def _dropout_generator(self, step: int, device: torch.device) -> torch.Generator | None:
        """Seeded by (run seed, step), so a run and its resumed continuation draw the same masks; None when no
        dropout can change anything (no residual head, dropout 0, or a gate fixed at 0)."""
        head = self.img
        if not isinstance(head, ResLowRankHead) or head.p == 0 or not hasattr(head, "gate_logit"):
            return None
        return torch.Generator(device=device).manual_seed(self._seed * 1_000_003 + step)

    def loss(self, batch: Any, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        config = self.config
        gen = self._dropout_generator(ctx.step, batch.image.cls.device)
        part = (getattr(batch, "offset", 0), batch.total)  # this rank's rows in the whole batch
        hi, ht, zi, zt = self._encode(batch.image, batch.text, gen, part)
        hi, ht = ctx.gather(hi, batch.sizes), ctx.gather(ht, batch.sizes)
        nce = info_nce(hi, ht, config.temperature)
        if config.structure_weight <= 0:
            return nce, {"info_nce": nce.item(), "structure": 0.0}
        zi, zt = ctx.gather(zi, batch.sizes), ctx.gather(zt, batch.sizes)  # frozen inputs: only STRUCTURE needs them
        lam = self.structure_lambda(None if ctx.finder else ctx.step)
        reg = self._structure(hi, ht, zi, zt)
        return nce + lam * reg, {"info_nce": nce.item(), "structure": reg.item()}

    def _structure(self, hi: Tensor, ht: Tensor, zi: Tensor, zt: Tensor) -> Tensor:
        c = self.config
        t, lv, div = c.structure_temperature, c.structure_levels, c.structure_divergence
        return 0.5 * (structure_loss(zi, hi, t, lv, div) + structure_loss(zt, ht, t, lv, div))

    def structure_lambda(self, stepped: int | None) -> float:
        """The regulariser weight the STRUCTURE code's CLIPLoss holds (clip_loss.py: it starts at the full weight,
        and each training step's `step()` sets weight * min(1, k / warmup) for that step k, counted from 0):
        `stepped` is the last training step k that ran, None before the first (the LR finder's trials)."""
        weight, warmup = self.config.structure_weight, self.config.structure_warmup_steps
        if stepped is None or warmup <= 0:
            return weight
        return weight * min(1.0, stepped / warmup)

    def heldout_penalty(self, batch: Any, steps_done: int) -> float:
        """lambda * STRUCTURE of a held-out batch, which the authors' validation adds to InfoNCE (it calls the same
        loss), at the weight after `steps_done` training steps; 0 without the regulariser."""
        if self.config.structure_weight <= 0:
            return 0.0
        with torch.no_grad():
            hi, ht, zi, zt = self._encode(batch.image, batch.text, None)
            lam = self.structure_lambda(steps_done - 1 if steps_done > 0 else None)
            return lam * float(self._structure(hi, ht, zi, zt))

    @property
    def val_temperature(self) -> float:
        return self.config.temperature


@register_method("linear")
class LinearHeads(ContrastiveHeads):
    """One Linear layer per modality."""

    Config = LinearConfig

    def make_head(self, din: int) -> nn.Module:
        return nn.Linear(din, self.config.dim)


@register_method("mlp")
class MLPHeads(ContrastiveHeads):
    """The STRUCTURE code's residual low-rank head per modality (or Linear-GELU-Linear with head="gelu")."""

    Config = MLPConfig

    def make_head(self, din: int) -> nn.Module:
        c = self.config
        if c.head == "gelu":
            return nn.Sequential(nn.Linear(din, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.dim))
        return ResLowRankHead(din, c.dim, c.rank, c.dropout, c.gate_init)
