"""PAL: projection-free anchor learning (arXiv 2605.16834). Only the two anchor banks are trained.

Each token is represented by its cosine similarities to K anchors of its own modality; per anchor, a softmax over
tokens (temperature tau_p) pools those similarities into a K-dim profile; image and text profiles, L2-normalised,
meet in a symmetric InfoNCE at temperature tau. The profile computation is `pipe_align.align.kernel.anchor_profiles`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.align.base import Aligner, ImageRows, MethodConfig, TextRows, l2n, register_method
from pipe_align.align.kernel import anchor_profiles


@dataclass(frozen=True)
class PALConfig(MethodConfig):
    """The authors' settings (for about 83k pairs) are the defaults; see DESIGN.md for small-data advice."""

    anchors: int = 512  # K
    tau_p: float = 0.03  # pooling temperature
    tau: float = 0.05  # InfoNCE temperature
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    epochs: int = 30
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    patience: int = 5  # early stopping on the val loss; 0 = off
    use_cls: bool = False  # add the image CLS token to the pooled tokens
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        checks = {"anchors": self.anchors >= 1, "tau_p": self.tau_p > 0, "tau": self.tau > 0,
                  "batch_size": self.batch_size >= 2, "lr": self.lr > 0, "epochs": self.epochs >= 1,
                  "val_fraction": 0 <= self.val_fraction < 1, "warmup_epochs": self.warmup_epochs >= 0,
                  "patience": self.patience >= 0, "grad_clip": self.grad_clip >= 0}  # fmt: skip
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad))


def image_token_view(rows: ImageRows, use_cls: bool) -> tuple[Tensor, Tensor]:
    """Tokens [N, T, D] and mask [N, T] of the image side (patches, optionally CLS first)."""
    tokens = rows.patches if not use_cls else torch.cat([rows.cls[:, None, :], rows.patches], dim=1)
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def info_nce(h_img: Tensor, h_txt: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE over the batch: pair i is the positive of row i and of column i."""
    logits = h_img @ h_txt.T / tau
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@register_method("pal")
class PAL(Aligner):
    Config = PALConfig
    needs_tokens = True
    weights_file = "anchors.safetensors"

    def __init__(self, config: PALConfig, image_dim: int | None = None, text_dim: int | None = None) -> None:
        super().__init__(config)
        self.image_anchors = torch.empty(0)
        self.text_anchors = torch.empty(0)
        if image_dim and text_dim:
            g = torch.Generator().manual_seed(config.seed)
            self.image_anchors = l2n(torch.randn(config.anchors, image_dim, generator=g))
            self.text_anchors = l2n(torch.randn(config.anchors, text_dim, generator=g))

    # -- the model --------------------------------------------------------------------------------------------------
    def image_profiles(self, rows: ImageRows, anchors: Tensor | None = None) -> Tensor:
        tokens, mask = image_token_view(rows, self.config.use_cls)
        a = self.image_anchors if anchors is None else anchors
        return anchor_profiles(tokens, mask, a, self.config.tau_p)

    def text_profiles(self, rows: TextRows, anchors: Tensor | None = None) -> Tensor:
        a = self.text_anchors if anchors is None else anchors
        return anchor_profiles(rows.tokens, rows.mask(), a, self.config.tau_p)

    @torch.no_grad()
    def image_global(self, rows: ImageRows) -> Tensor:
        return l2n(self.image_profiles(rows))

    @torch.no_grad()
    def text_global(self, rows: TextRows) -> Tensor:
        return l2n(self.text_profiles(rows))

    @torch.no_grad()
    def image_dense(self, patches: Tensor) -> Tensor:
        """S[n, p, k] = cos(patch, a_k): decoding through the anchors, class scores = S . h(prompt)."""
        return l2n(patches) @ l2n(self.image_anchors).T.to(patches.device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"image_anchors": self.image_anchors, "text_anchors": self.text_anchors}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.image_anchors, self.text_anchors = state["image_anchors"], state["text_anchors"]

    # -- training ---------------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train, val, config: PALConfig, log: Callable[[dict], None], unpaired=None) -> PAL:
        """Plain in-process training (no checkpoints); `align.train` drives resumable runs through `Trainer`."""
        from pipe_align.align.train import Trainer

        trainer = Trainer(config, train, val, device=str(train.device))
        return trainer.run(log=log)


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
