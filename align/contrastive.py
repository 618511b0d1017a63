"""Contrastive heads on frozen features (`linear`, `mlp`), with the optional STRUCTURE regulariser.

One head per modality maps L2-normalised frozen features into a shared E-dim space (linear: one Linear; mlp:
Linear-GELU-Linear); the heads are trained with the symmetric InfoNCE loss (CLIP's) at a fixed temperature. Inputs
are L2-normalised (so the learning rate means the same whatever the encoder's feature scale) and, with `center`,
shifted by their training mean (the shared direction of a token set otherwise dominates pooled MLP outputs).

`pool="token"` projects every token with the head and mean-pools the valid tokens (image patches / word tokens),
the token-level counterpart of the global heads; it needs the token arrays (`wants_tokens`). For the linear head
that equals projecting the mean token, for the MLP it does not, and the token MLP needs many more optimiser steps
than the global one: with a few hundred pairs use a small `batch_size` (one step per epoch barely moves it).

STRUCTURE (Groeger, Wen, Le, Brbic, NeurIPS 2025, "With limited data for multimodal alignment, let the STRUCTURE
guide you") adds lambda * mean over modalities of a divergence between in-batch neighbourhood distributions of the
frozen input features and of the aligned outputs: each side L2-normalised then mean-centred over the batch,
similarities / temperature, row softmax, and the Jensen-Shannon divergence per row averaged over the batch (levels > 1
also compares powers of the row-stochastic matrices, i.e. multi-step neighbourhoods, weighted equally). The authors'
code uses lambda = 10 with a linear warm-up, one level, mean centring, and the contrastive temperature as the
structure temperature; we do the same with the warm-up counted in epochs (`structure_warmup`; theirs counts 500 steps).
The divergence is their code's, 1/2 [KL(M || A) + KL(M || O)] (`structure_divergence="reference"`, the default); the
textbook Jensen-Shannon divergence, 1/2 [KL(A || M) + KL(O || M)], is the named variant `structure_divergence="js"`.

Each epoch draws a new caption per image (the PairSource's epoch-seeded draw). Early stopping watches the val InfoNCE
(no regulariser) and keeps the best epoch's weights. Training is deterministic given `seed` on a given device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipe_align.align.base import (
    ImageRows,
    StepContext,
    TextRows,
    TrainedAligner,
    TrainedConfig,
    TrainingData,
    l2n,
    register_method,
)
from pipe_align.align.baseline import BaselineConfig, image_input, text_input
from pipe_align.align.losses import info_nce
from pipe_align.extract.errors import PipeError

POOLS = ("global", "token")
DIVERGENCES = ("reference", "js")


@dataclass(frozen=True)
class LinearConfig(TrainedConfig, BaselineConfig):
    """Hyper-parameters of the contrastive heads (defaults: CLIP-style heads trained on few pairs)."""

    pool: str = field(default="global", metadata={
        "help": "linear, mlp: global (project the global feature) or token (project every token, mean-pool)."})
    dim: int = field(default=512, metadata={"help": "linear, mlp: output dimension of the heads."})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (baselines)."})
    structure_weight: float = field(default=0.0, metadata={
        "help": "linear, mlp: STRUCTURE regulariser weight lambda; 0 = off (the STRUCTURE paper uses 10)."})
    structure_warmup: float = field(default=5.0, metadata={
        "help": "linear, mlp: epochs of linear warm-up of lambda."})
    structure_temperature: float = field(default=0.05, metadata={"help": "linear, mlp: STRUCTURE temperature."})
    structure_levels: int = field(default=1, metadata={"help": "linear, mlp: STRUCTURE neighbourhood levels."})
    structure_divergence: str = field(default="reference", metadata={
        "help": "linear, mlp: reference (the STRUCTURE code's 1/2[KL(M||A)+KL(M||O)]) or js (textbook JS)."})
    center: bool = field(default=True, metadata={
        "help": "linear, mlp: subtract the training mean of the normalised inputs before the head."})

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
        if self.structure_weight < 0 or self.structure_warmup < 0:
            raise PipeError("structure_weight and structure_warmup must be >= 0")


@dataclass(frozen=True)
class MLPConfig(LinearConfig):
    hidden: int = field(default=1024, metadata={"help": "mlp: hidden width."})

    def check(self) -> None:
        super().check()
        if self.hidden < 1:
            raise PipeError(f"hidden={self.hidden}: must be >= 1")


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


def structure_loss(original: Tensor, aligned: Tensor, temperature: float, levels: int = 1,
                   divergence: str = "reference") -> Tensor:  # fmt: skip
    """STRUCTURE divergence between the batch neighbourhoods of frozen features and of aligned outputs."""
    po, pa = _neighbourhoods(original.detach(), temperature), _neighbourhoods(aligned, temperature)
    total = original.new_zeros(())
    for level in range(1, levels + 1):
        pl, ql = torch.linalg.matrix_power(po, level), torch.linalg.matrix_power(pa, level)
        total = total + neighbourhood_divergence(pl, ql, divergence)
    return total / levels


def _head(kind: str, din: int, dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(din, dim)
    return nn.Sequential(nn.Linear(din, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ContrastiveHeads(TrainedAligner):
    """Two heads trained with InfoNCE (+ STRUCTURE); subclasses pick the head kind."""

    Config = LinearConfig
    kind: ClassVar[str] = "linear"
    run_defaults = {"epochs": 50, "batch_size": 1024, "patience": 5}

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
        self.needs_tokens = self.wants_tokens(config)
        self.img_head: nn.Module | None = None
        self.txt_head: nn.Module | None = None
        self.center_img: Tensor | None = None  # [D] input centre (zeros when config.center is False)
        self.center_txt: Tensor | None = None

    @classmethod
    def wants_tokens(cls, config: LinearConfig) -> bool:
        return config.image_feature == "mean" or config.pool == "token"

    # -- inputs and encoders ------------------------------------------------------------------------------------------
    def _image_tokens(self, rows: ImageRows) -> Tensor:
        """The frozen input the image head sees, L2-normalised (before centring): [N, D] or [N, P, D] tokens."""
        if self.config.pool == "token":
            if rows.patches is None:
                raise PipeError("pool='token' needs the patch tokens (wants_tokens(config) is True)")
            return l2n(rows.patches)  # [N, P, D]
        return l2n(image_input(rows, self.config.image_feature))  # [N, D]

    def _text_tokens(self, rows: TextRows) -> tuple[Tensor, Tensor | None]:
        """The frozen input of the text head (L2-normalised) and its token mask (None for a global input)."""
        if self.config.pool == "token":
            if rows.tokens is None:
                raise PipeError("pool='token' needs the word tokens (wants_tokens(config) is True)")
            return l2n(rows.tokens), rows.mask()
        return l2n(text_input(rows)), None

    @staticmethod
    def _pool(h: Tensor, mask: Tensor | None) -> Tensor:
        """Mean over the token axis (valid tokens only); a global input [N, *] passes through."""
        if h.dim() == 2:
            return h
        if mask is None:
            return h.mean(1)
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def _apply(self, side: str, z: Tensor) -> Tensor:
        """The head of `side` on centred inputs (token-wise: the last dim is the feature dim)."""
        head = self.img_head if side == "img" else self.txt_head
        center = self.center_img if side == "img" else self.center_txt
        return head.to(z.device)(z - center.to(z.device))

    def _encode(self, image: ImageRows, text: TextRows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image out, text out, image frozen input, text frozen input), outputs L2-normalised, inputs pooled."""
        zi = self._image_tokens(image)
        zt, mask = self._text_tokens(text)
        hi = l2n(self._pool(self._apply("img", zi), None))
        ht = l2n(self._pool(self._apply("txt", zt), mask))
        return hi, ht, self._pool(zi, None), self._pool(zt, mask)

    def image_global(self, rows: ImageRows) -> Tensor:
        with torch.no_grad():
            return l2n(self._pool(self._apply("img", self._image_tokens(rows)), None))

    def text_global(self, rows: TextRows) -> Tensor:
        with torch.no_grad():
            zt, mask = self._text_tokens(rows)
            return l2n(self._pool(self._apply("txt", zt), mask))

    def image_dense(self, patches: Tensor) -> Tensor:
        with torch.no_grad():
            return l2n(self._apply("img", l2n(patches)))

    def _centres(self, train: Any, seed: int) -> tuple[Tensor, Tensor]:
        """Mean normalised input token (or global feature) of each side over the training pairs (epoch-0 captions).
        Without it an MLP on tokens starts with pooled outputs dominated by the tokens' shared direction."""
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
        config = self.config
        first = next(iter(data.train.batches(epoch=0, batch_size=2, seed=seed, shuffle=False)))
        device = first.image.cls.device
        di = self._image_tokens(first.image).shape[-1]
        dt = self._text_tokens(first.text)[0].shape[-1]
        if config.center:
            self.center_img, self.center_txt = self._centres(data.train, seed)
        else:
            self.center_img, self.center_txt = torch.zeros(di, device=device), torch.zeros(dt, device=device)
        hidden = getattr(config, "hidden", 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.img_head = _head(self.kind, di, config.dim, hidden).to(device)
            self.txt_head = _head(self.kind, dt, config.dim, hidden).to(device)

    def parameters(self) -> list[Tensor]:
        return [*self.img_head.parameters(), *self.txt_head.parameters()]

    def loss(self, batch: Any, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        config = self.config
        hi, ht, zi, zt = self._encode(batch.image, batch.text)
        hi, ht = ctx.gather(hi, batch.sizes), ctx.gather(ht, batch.sizes)
        nce = info_nce(hi, ht, config.temperature)
        if config.structure_weight <= 0:
            return nce, {"info_nce": nce.item(), "structure": 0.0}
        zi, zt = ctx.gather(zi, batch.sizes), ctx.gather(zt, batch.sizes)  # frozen inputs: only STRUCTURE needs them
        warmup_steps = config.structure_warmup * ctx.steps_per_epoch
        lam = config.structure_weight * (min(1.0, ctx.step / warmup_steps) if warmup_steps > 0 else 1.0)
        t, lv, div = config.structure_temperature, config.structure_levels, config.structure_divergence
        reg = 0.5 * (structure_loss(zi, hi, t, lv, div) + structure_loss(zt, ht, t, lv, div))
        return nce + lam * reg, {"info_nce": nce.item(), "structure": reg.item()}

    @property
    def val_temperature(self) -> float:
        return self.config.temperature

    # -- persistence --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        out = {f"img.{k}": v for k, v in self.img_head.state_dict().items()}
        out |= {f"txt.{k}": v for k, v in self.txt_head.state_dict().items()}
        return out | {"center_img": self.center_img, "center_txt": self.center_txt}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Rebuild the heads from the saved shapes (the input dims are not in the config) and load the weights."""
        heads = []
        for side in ("img", "txt"):
            sub = {k[len(side) + 1 :]: v for k, v in state.items() if k.startswith(side + ".")}
            if self.kind == "linear":
                dim, din = sub["weight"].shape
                hidden = 0
            else:
                (hidden, din), dim = sub["0.weight"].shape, sub["2.weight"].shape[0]
            head = _head(self.kind, din, dim, hidden).to(next(iter(sub.values())).device)
            head.load_state_dict(sub)
            heads.append(head)
        self.img_head, self.txt_head = heads
        self.center_img, self.center_txt = state["center_img"], state["center_txt"]


@register_method("linear")
class LinearHeads(ContrastiveHeads):
    """One Linear layer per modality."""

    Config = LinearConfig
    kind = "linear"


@register_method("mlp")
class MLPHeads(ContrastiveHeads):
    """Linear-GELU-Linear per modality (hidden width `hidden`)."""

    Config = MLPConfig
    kind = "mlp"
