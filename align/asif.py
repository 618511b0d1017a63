"""ASIF (Norelli et al., NeurIPS 2023): training-free alignment through relative representations over paired anchors.

Fitting only stores anchors: the training pairs' global features, L2-normalised, image i and caption i being anchor i
of their modality. A sample is represented by its cosine similarities to its *own* modality's anchors; only the top
`k` are kept, raised to the power `p` and the vector L2-normalised. Because anchor i is the same pair on both sides,
image and text representations live in one anchor-indexed space of dimension n_anchors and can be compared
directly. Defaults k = 800, p = 8 are the paper's (and its code's `non_zeros=800`). The kept similarities are raised
to the power p as they are, negative ones included, as the authors do; `clamp_negative=True` (ours, off by default)
sets negative similarities to 0 first, which keeps an odd or fractional p well defined and never lets a dissimilar
anchor count as similar. Without the clamp, p must be an integer (a fractional power of a negative number is NaN).

Outputs are dense [*, n_anchors] tensors. `image_dense` applies the same representation to every patch token, so it
costs P x n_anchors floats per image: fine for small anchor sets (the few-pair regime this baseline is for);
`n_anchors` subsamples the anchors (seeded) when the training set is large.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError

from .base import (
    INT_LIMIT,
    ClosedFormAligner,
    ImageRows,
    TextRows,
    TrainingData,
    l2n,
    register_method,
    saved_size,
)
from .baseline import BaselineConfig, BaselineState, gather_pairs, image_input, text_input


@dataclass(frozen=True)
class ASIFConfig(BaselineConfig):
    k: int = field(default=800, metadata={"help": "asif: non-zero entries per relative representation."})
    p: float = field(default=8.0, metadata={"help": "asif: exponent on the kept similarities."})
    n_anchors: int | None = field(
        default=None, metadata={"help": "asif: a seeded random subset of the training pairs as anchors (default all)."}
    )
    block: int = field(default=1024, metadata={"help": "asif: rows computed at once (memory bound)."})
    clamp_negative: bool = field(
        default=False,
        metadata={"help": "asif: set negative similarities to 0 before the power (ours; the authors keep them)."},
    )

    def check(self) -> None:
        super().check()
        if self.k < 1 or self.block < 1 or (self.n_anchors is not None and self.n_anchors < 1):
            raise PipeError(f"k={self.k}, block={self.block}, n_anchors={self.n_anchors}: must be >= 1")
        if not self.clamp_negative and not float(self.p).is_integer():
            raise PipeError(
                f"p={self.p}: a fractional power of negative similarities is undefined; use an integer p "
                "or clamp_negative=true"
            )


def relative_representation(
    z: Tensor, anchors: Tensor, k: int, p: float, block: int = 1024, clamp_negative: bool = False
) -> Tensor:
    """[..., D] -> [..., A]: top-k cosine similarities to the anchors (negatives set to 0 with `clamp_negative`), to
    the power p, L2-normalised."""
    shape = z.shape[:-1]
    flat = l2n(z.reshape(-1, z.shape[-1]))
    anchors = anchors.to(flat.device, torch.float32)
    k = min(k, anchors.shape[0])
    out = torch.zeros(flat.shape[0], anchors.shape[0], device=flat.device)
    for b0 in range(0, flat.shape[0], block):
        sims = flat[b0 : b0 + block] @ anchors.T
        vals, idx = torch.topk(sims, k, dim=1)
        out[b0 : b0 + block].scatter_(1, idx, (vals.clamp(min=0) if clamp_negative else vals).pow(p))
    return l2n(out).reshape(*shape, anchors.shape[0])


@register_method("asif")
class ASIF(BaselineState, ClosedFormAligner):
    """Relative representations w.r.t. the paired anchors (no training)."""

    Config = ASIFConfig

    @classmethod
    def fit(cls, data: TrainingData, config: ASIFConfig, seed: int) -> tuple[ASIF, dict[str, Any]]:
        x, y = gather_pairs(data.train, config.image_feature, seed)
        if config.n_anchors is not None and config.n_anchors < len(x):
            keep = np.sort(np.random.default_rng([seed, 11]).permutation(len(x))[: config.n_anchors])
            x, y = x[torch.as_tensor(keep, device=x.device)], y[torch.as_tensor(keep, device=y.device)]
        self = cls(config)
        self.set_buffers({"anchors_img": l2n(x), "anchors_txt": l2n(y)})
        return self, {"pairs": len(x), "anchors": len(x), "k": min(config.k, len(x))}

    @classmethod
    def blank(cls, config: ASIFConfig, shapes: dict[str, tuple[int, ...]]) -> ASIF:
        """The anchor count is the fit's (the training pairs, at most `n_anchors`)."""
        a = min(saved_size(shapes, "anchors_img", 0), config.n_anchors or INT_LIMIT)
        di, dt = saved_size(shapes, "anchors_img", 1), saved_size(shapes, "anchors_txt", 1)
        return cls.with_shapes(config, {"anchors_img": (a, di), "anchors_txt": (a, dt)})

    def _rel(self, z: Tensor, side: str) -> Tensor:
        cfg = self.config
        return relative_representation(z, self._get(f"anchors_{side}", z), cfg.k, cfg.p, cfg.block, cfg.clamp_negative)

    def image_global(self, rows: ImageRows) -> Tensor:
        return self._rel(image_input(rows, self.config.image_feature), "img")

    def text_global(self, rows: TextRows) -> Tensor:
        return self._rel(text_input(rows), "txt")

    def image_dense(self, patches: Tensor) -> Tensor:
        return self._rel(patches, "img")
