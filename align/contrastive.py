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
Their code's "JS" sums KL(M || A) + KL(M || O); we use the textbook JS, KL(A || M) + KL(O || M), both halved.

Each epoch draws a new caption per image (the PairSource's epoch-seeded draw). Early stopping watches the val InfoNCE
(no regulariser) and keeps the best epoch's weights. Training is deterministic given `seed` on a given device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipe_align.align.base import ImageRows, TextRows, l2n, register_method
from pipe_align.align.procrustes import BaselineAligner, BaselineConfig, image_input, text_input
from pipe_align.extract.errors import PipeError

POOLS = ("global", "token")


@dataclass(frozen=True)
class LinearConfig(BaselineConfig):
    """Hyper-parameters of the contrastive heads (defaults: CLIP-style heads trained on few pairs)."""

    pool: str = "global"
    dim: int = 512
    temperature: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 50
    patience: int = 5
    batch_size: int = 1024
    structure_weight: float = 0.0  # lambda; 0 = off (the STRUCTURE paper uses 10)
    structure_warmup: float = 5.0  # epochs of linear warm-up of lambda
    structure_temperature: float = 0.05
    structure_levels: int = 1
    center: bool = True  # subtract the training mean of the (normalised) input tokens before the head

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in POOLS:
            raise PipeError(f"pool={self.pool!r}; valid: {', '.join(POOLS)}")
        if min(self.dim, self.epochs, self.batch_size, self.structure_levels) < 1:
            raise PipeError("dim, epochs, batch_size and structure_levels must be >= 1")
        if self.temperature <= 0 or self.structure_temperature <= 0:
            raise PipeError("temperatures must be > 0")


@dataclass(frozen=True)
class MLPConfig(LinearConfig):
    hidden: int = 1024


def info_nce(img: Tensor, txt: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE of row-aligned, L2-normalised embeddings (pair i is the positive of row and column i)."""
    logits = img @ txt.T / temperature
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _neighbourhoods(z: Tensor, temperature: float) -> Tensor:
    z = l2n(z)
    z = z - z.mean(0, keepdim=True)
    return torch.softmax(z @ z.T / temperature, dim=-1)


def _js_rows(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over rows of JS(p_row || q_row)."""
    m = 0.5 * (p + q)
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(-1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def structure_loss(original: Tensor, aligned: Tensor, temperature: float, levels: int = 1) -> Tensor:
    """STRUCTURE divergence between the batch neighbourhoods of frozen features and of aligned outputs."""
    po, pa = _neighbourhoods(original.detach(), temperature), _neighbourhoods(aligned, temperature)
    total = original.new_zeros(())
    for level in range(1, levels + 1):
        total = total + _js_rows(torch.linalg.matrix_power(po, level), torch.linalg.matrix_power(pa, level))
    return total / levels


def _head(kind: str, din: int, dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(din, dim)
    return nn.Sequential(nn.Linear(din, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ContrastiveHeads(BaselineAligner):
    """Two heads trained with InfoNCE (+ STRUCTURE); subclasses pick the head kind."""

    Config = LinearConfig
    kind: ClassVar[str] = "linear"

    def __init__(self, config: LinearConfig) -> None:
        super().__init__(config)
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

    def _centres(self, train: Any) -> tuple[Tensor, Tensor]:
        """Mean normalised input token (or global feature) of each side over the training pairs (epoch-0 captions).
        Without it an MLP on tokens starts with pooled outputs dominated by the tokens' shared direction."""
        si = st = None
        ni = nt = 0
        for b in train.batches(epoch=0, batch_size=1024, seed=self.config.seed, shuffle=False):
            zi = self._image_tokens(b.image)
            zi = zi.reshape(-1, zi.shape[-1])
            zt, mask = self._text_tokens(b.text)
            zt = zt[mask] if mask is not None else zt
            si = zi.sum(0) if si is None else si + zi.sum(0)
            st = zt.sum(0) if st is None else st + zt.sum(0)
            ni, nt = ni + len(zi), nt + len(zt)
        return si / max(ni, 1), st / max(nt, 1)

    # -- training -----------------------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, train: Any, val: Any | None, config: LinearConfig, log: Callable[[dict], None],
        unpaired: tuple[ImageRows, TextRows] | None = None,
    ) -> ContrastiveHeads:  # fmt: skip
        self = cls(config)
        first = next(iter(train.batches(epoch=0, batch_size=2, seed=config.seed, shuffle=False)))
        device = first.image.cls.device
        di = self._image_tokens(first.image).shape[-1]
        dt = self._text_tokens(first.text)[0].shape[-1]
        if config.center:
            self.center_img, self.center_txt = self._centres(train)
        else:
            self.center_img, self.center_txt = torch.zeros(di, device=device), torch.zeros(dt, device=device)
        hidden = getattr(config, "hidden", 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.img_head = _head(cls.kind, di, config.dim, hidden).to(device)
            self.txt_head = _head(cls.kind, dt, config.dim, hidden).to(device)
        params = [*self.img_head.parameters(), *self.txt_head.parameters()]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
        warmup_steps = config.structure_warmup * steps_per_epoch
        best, best_state, bad, step = math.inf, None, 0, 0
        for epoch in range(config.epochs):
            sums = {"train_loss": 0.0, "info_nce": 0.0, "structure": 0.0}
            n_batches = 0
            for batch in train.batches(epoch=epoch, batch_size=config.batch_size, seed=config.seed, shuffle=True):
                hi, ht, zi, zt = self._encode(batch.image, batch.text)
                nce = info_nce(hi, ht, config.temperature)
                loss = nce
                if config.structure_weight > 0:
                    lam = config.structure_weight * (min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0)
                    reg = 0.5 * (
                        structure_loss(zi, hi, config.structure_temperature, config.structure_levels)
                        + structure_loss(zt, ht, config.structure_temperature, config.structure_levels)
                    )
                    loss = nce + lam * reg
                    sums["structure"] += reg.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                n_batches += 1
                sums["train_loss"] += loss.item()
                sums["info_nce"] += nce.item()
            record = {"epoch": epoch} | {k: v / max(n_batches, 1) for k, v in sums.items()}
            if val is not None:
                record["val_loss"] = self.val_loss(val)
                if record["val_loss"] < best - 1e-6:
                    best, bad = record["val_loss"], 0
                    best_state = copy.deepcopy(self.state_dict())
                else:
                    bad += 1
            log(record)
            if val is not None and bad >= config.patience:
                break
        if best_state is not None:
            self.load_state_dict(best_state)
        return self

    def val_loss(self, val: Any) -> float:
        """Mean InfoNCE over fixed (epoch 0, unshuffled) val batches: comparable across epochs."""
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in val.batches(epoch=0, batch_size=self.config.batch_size, seed=self.config.seed, shuffle=False):
                hi, ht, _, _ = self._encode(batch.image, batch.text)
                total += float(info_nce(hi, ht, self.config.temperature)) * len(hi)
                n += len(hi)
        return total / max(n, 1)

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
