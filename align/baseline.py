"""What the global-feature baselines share: the image feature option, the gathered training pairs, a linear map
applied to global or per-patch features, and a flat tensor state. Each baseline's own file is about the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError

from .base import ImageRows, MethodConfig, TextRows, l2n

IMAGE_FEATURES = ("cls", "mean")


@dataclass(frozen=True)
class BaselineConfig(MethodConfig):
    """Options every baseline has."""

    image_feature: str = field(
        default="cls",
        metadata={
            "help": "Baselines: the image's global feature, the stored CLS token (cls) or the mean of its patch tokens "
            "(mean)."
        },
    )

    def check(self) -> None:
        if self.image_feature not in IMAGE_FEATURES:
            raise PipeError(f"image_feature={self.image_feature!r}; valid: {', '.join(IMAGE_FEATURES)}")


class BaselineState:
    """Mixin: the fitted tensors as buffers (what is saved) and `needs_tokens` decided by the config."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        # Shadows the class attribute: whether *this* configuration reads token arrays (evaluation asks the instance).
        self.needs_tokens = self.wants_tokens(config)

    @classmethod
    def wants_tokens(cls, config: BaselineConfig) -> bool:
        return config.image_feature == "mean"

    def set_buffers(self, tensors: dict[str, Tensor]) -> None:
        for name, t in tensors.items():
            self.register_buffer(name, t)

    @classmethod
    def with_shapes(cls, config: BaselineConfig, shapes: dict[str, tuple[int, ...]]) -> BaselineState:
        """The method with uninitialised buffers of these shapes (what `blank` returns, to be loaded into)."""
        out = cls(config)
        out.set_buffers({k: torch.empty(shape) for k, shape in shapes.items()})
        return out

    def _get(self, name: str, like: Tensor) -> Tensor:
        return getattr(self, name).to(like.device)


def image_input(rows: ImageRows, image_feature: str) -> Tensor:
    """[N, D] float32 global image feature chosen by the config."""
    if image_feature == "cls":
        return rows.cls.float()
    if rows.patches is None:
        raise PipeError(
            "image_feature='mean' needs the patch tokens; load the pairs with tokens "
            "(the method's wants_tokens(config) is True)"
        )
    return rows.patches.float().mean(dim=1)


def text_input(rows: TextRows) -> Tensor:
    """[M, D] float32 sentence embedding (the encoder's own pooling)."""
    return rows.pooled.float()


def gather_pairs(source: Any, image_feature: str, seed: int, epoch: int = 0) -> tuple[Tensor, Tensor]:
    """All training pairs' global features (small: one row per image), one caption per image as drawn for `epoch`."""
    xs, ys = [], []
    for batch in source.batches(epoch=epoch, batch_size=4096, seed=seed, shuffle=False):
        xs.append(image_input(batch.image, image_feature))
        ys.append(text_input(batch.text))
    if not xs:
        raise PipeError("no training pairs")
    return torch.cat(xs), torch.cat(ys)


def linear_embed(z: Tensor, mean: Tensor, weight: Tensor, l2_input: bool, bias: Tensor | None = None) -> Tensor:
    """l2n(pre(z) @ W + b) on the last dim, so it serves [N, D] globals and [N, P, D] patches alike."""
    z = z.float() - mean
    if l2_input:
        z = l2n(z)
    out = z @ weight
    if bias is not None:
        out = out + bias
    return l2n(out)


def pca_basis(z: Tensor, dim: int) -> Tensor:
    """[D, dim] top principal directions of (already centred) rows; the identity when no reduction is needed."""
    d = z.shape[1]
    if dim >= d:
        return torch.eye(d, dtype=z.dtype, device=z.device)
    zc = z - z.mean(0, keepdim=True)
    evals, evecs = torch.linalg.eigh(zc.T @ zc)
    return evecs[:, torch.argsort(evals, descending=True)[:dim]]
