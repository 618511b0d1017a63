"""PAL with fixed, data-paired anchors and no training: the PAL authors' "ASIF" row (shiwonkim/PAL_working,
configs/asif/vitl_roberta/fixed_cap.yaml: `fix_anchors: true`, K 512, tau_p 0.03, the same layers as PAL).

Their definition (src/training/trainers/alignment_trainer.py:1438-1485 and `_pool_anchor_vecs` at :1421-1436;
src/models/alignment/pal.py `set_anchors_from_data`): K training pairs drawn by a seeded `torch.randperm`, the same
rows for both modalities so that image anchor k and text anchor k are one real (image, caption) pair; image anchor k
is the mean of that image's tokens (CLS + patches, as PAL pools them), text anchor k the mean of its caption's
tokens over the attention mask, both L2-normalised and frozen. Everything else (cross-attention pooling over tokens,
decoding through the anchors) is PAL's, so the only difference to a trained PAL is fixed against learned anchors.
The captions are the run's (`--captions first`: each image's first, as theirs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError

from .base import (
    ClosedFormAligner,
    ImageRows,
    MethodConfig,
    TextRows,
    TrainingData,
    l2n,
    register_method,
)
from .pal import AnchorProfiles, image_token_view


@dataclass(frozen=True)
class PALFixedConfig(MethodConfig):
    anchors: int = field(default=512, metadata={"help": "pal, pal-fixed: anchors per modality K."})
    tau_p: float = field(default=0.03, metadata={"help": "pal, pal-fixed: pooling temperature over tokens."})
    tau: float = field(default=0.05, metadata={"help": "pal, pal-fixed: InfoNCE temperature (held-out loss)."})
    use_cls: bool = field(default=True, metadata={"help": "pal, pal-fixed: pool the image CLS token with the patches."})

    def check(self) -> None:
        if self.anchors < 1 or self.tau_p <= 0 or self.tau <= 0:
            raise PipeError(f"anchors={self.anchors}, tau_p={self.tau_p}, tau={self.tau}: out of range")


@register_method("pal-fixed")
class PALFixed(AnchorProfiles, ClosedFormAligner):
    """PAL's model (`AnchorProfiles`) over anchors fixed to K training pairs: buffers, nothing is trained."""

    Config = PALFixedConfig
    needs_tokens = True
    weights_file = "anchors.safetensors"

    def set_anchors(self, image: Tensor, text: Tensor) -> None:
        self.register_buffer("image_anchors", image)
        self.register_buffer("text_anchors", text)

    @classmethod
    def fit(cls, data: TrainingData, config: PALFixedConfig, seed: int) -> tuple[PALFixed, dict[str, Any]]:
        train = data.train
        if not hasattr(train, "batch_of"):
            raise PipeError("pal-fixed reads its anchor pairs from the feature stores (pipe align)")
        n = len(train)
        if config.anchors > n:
            raise PipeError(f"pal-fixed: anchors={config.anchors} exceeds the {n} training pairs")
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: config.anchors].numpy()
        batch = train.batch_of(pick, 0, seed)
        out = cls(config)
        out.set_anchors(*anchor_vectors(batch.image, batch.text, config.use_cls))
        return out, {"anchor_pairs": int(config.anchors), "training_pairs": int(n)}

    @property
    def val_temperature(self) -> float:
        return self.config.tau


def anchor_vectors(image: ImageRows, text: TextRows, use_cls: bool) -> tuple[Tensor, Tensor]:
    """(image anchors, text anchors) [K, D], L2-normalised: each pair's mean token (the caption's over its mask)."""
    tokens, _ = image_token_view(image, use_cls)
    mask = text.mask().unsqueeze(-1).float()
    words = (text.tokens.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    return l2n(tokens.float().mean(1)), l2n(words)
