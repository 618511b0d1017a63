"""Orthogonal Procrustes: the simplest post-hoc alignment, a rotation between the two (PCA-reduced) spaces.

Both modalities' global features are mean-centred and L2-normalised; when their dimensions differ, each is first
projected onto its own top-`dim` principal directions (d = min(Di, Dt) by default) so a square rotation exists. The
rotation is the closed form R = U V^T of the SVD of X^T Y (Schoenemann 1966), which maximises tr(R^T X^T Y) over
orthogonal R. The image side is rotated into the text's (PCA) space; both outputs are L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.extract.errors import PipeError

from .base import ClosedFormAligner, ImageRows, TextRows, TrainingData, register_method, saved_size
from .baseline import (
    BaselineConfig,
    BaselineState,
    gather_pairs,
    image_input,
    linear_embed,
    pca_basis,
    text_input,
)


@dataclass(frozen=True)
class ProcrustesConfig(BaselineConfig):
    dim: int | None = field(
        default=None, metadata={"help": "procrustes: shared dimension after PCA (default min(Di, Dt))."}
    )

    def check(self) -> None:
        super().check()
        if self.dim is not None and self.dim < 1:
            raise PipeError(f"dim={self.dim}: must be >= 1")


def shared_dim(image_dim: int, text_dim: int, dim: int | None) -> int:
    """The rotation's size: `dim` (default: the smaller input dim), at most either input dim."""
    return min(image_dim, text_dim) if dim is None else min(dim, image_dim, text_dim)


def procrustes_fit(x: Tensor, y: Tensor, dim: int | None = None) -> dict[str, Tensor]:
    """Means, PCA bases and rotation (float64 maths, float32 results) for paired rows x [N, Di], y [N, Dt]."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xn, yn = F.normalize(x - mean_x, dim=-1), F.normalize(y - mean_y, dim=-1)
    d = shared_dim(x.shape[1], y.shape[1], dim)
    basis_x, basis_y = pca_basis(xn, d), pca_basis(yn, d)
    u, _, vh = torch.linalg.svd((xn @ basis_x).T @ (yn @ basis_y))
    rotation = u @ vh
    out = {"mean_img": mean_x, "mean_txt": mean_y, "basis_img": basis_x, "basis_txt": basis_y, "rotation": rotation}
    return {k: v.float() for k, v in out.items()}


@register_method("procrustes")
class Procrustes(BaselineState, ClosedFormAligner):
    """Rotation between mean-centred, L2-normalised (and PCA-reduced) global features."""

    Config = ProcrustesConfig

    @classmethod
    def fit(cls, data: TrainingData, config: ProcrustesConfig, seed: int) -> tuple[Procrustes, dict[str, Any]]:
        x, y = gather_pairs(data.train, config.image_feature, seed)
        self = cls(config)
        self.set_buffers(procrustes_fit(x, y, config.dim))
        return self, {"pairs": len(x), "dim": int(self.rotation.shape[0])}

    @classmethod
    def blank(cls, config: ProcrustesConfig, shapes: dict[str, tuple[int, ...]]) -> Procrustes:
        di, dt = saved_size(shapes, "mean_img", 0), saved_size(shapes, "mean_txt", 0)
        d = shared_dim(di, dt, config.dim)
        return cls.with_shapes(
            config,
            {"mean_img": (di,), "mean_txt": (dt,), "basis_img": (di, d), "basis_txt": (dt, d), "rotation": (d, d)},
        )

    def _image(self, z: Tensor) -> Tensor:
        w = self._get("basis_img", z) @ self._get("rotation", z)
        return linear_embed(z, self._get("mean_img", z), w, l2_input=True)

    def image_global(self, rows: ImageRows) -> Tensor:
        return self._image(image_input(rows, self.config.image_feature))

    def text_global(self, rows: TextRows) -> Tensor:
        z = text_input(rows)
        return linear_embed(z, self._get("mean_txt", z), self._get("basis_txt", z), l2_input=True)

    def image_dense(self, patches: Tensor) -> Tensor:
        return self._image(patches)
