"""The contrastive loss the methods share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(img: Tensor, txt: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE of row-aligned, L2-normalised embeddings (pair i is the positive of row i and of column i)."""
    logits = img @ txt.T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
