"""Orthogonal Procrustes: the simplest post-hoc alignment, a rotation between the two (PCA-reduced) spaces.

Both modalities' global features are mean-centred and L2-normalised; when their dimensions differ, each is first
projected onto its own top-`dim` principal directions (d = min(Di, Dt) by default) so a square rotation exists. The
rotation is the closed form R = U V^T of the SVD of X^T Y (Schoenemann 1966), which maximises tr(R^T X^T Y) over
orthogonal R. The image side is rotated into the text's (PCA) space; both outputs are L2-normalised.

This module also holds the pieces every global-feature baseline shares (config base, feature selection, gathering
the training pairs, a linear map applied to global or per-patch features), so each baseline file stays about the
method itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipe_align.align.base import Aligner, ImageRows, MethodConfig, TextRows, l2n, register_method
from pipe_align.extract.errors import PipeError

IMAGE_FEATURES = ("cls", "mean")


# -- shared by the baselines -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaselineConfig(MethodConfig):
    """Options every baseline has. `image_feature`: the image's global feature, the stored CLS token ("cls") or the
    mean of its patch tokens ("mean", which makes the loader read patch tokens: see `wants_tokens`)."""

    image_feature: str = "cls"

    def __post_init__(self) -> None:
        if self.image_feature not in IMAGE_FEATURES:
            raise PipeError(f"image_feature={self.image_feature!r}; valid: {', '.join(IMAGE_FEATURES)}")


class BaselineAligner(Aligner):
    """Common plumbing: a flat tensor state (what is saved), and `needs_tokens` decided by the config."""

    Config = BaselineConfig

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__(config)
        # Shadows the class attribute: whether *this* configuration reads token arrays (the loader asks before fit
        # through the classmethod `wants_tokens(config)`; evaluation can ask the fitted instance).
        self.needs_tokens = self.wants_tokens(config)
        self.state: dict[str, Tensor] = {}

    @classmethod
    def wants_tokens(cls, config: BaselineConfig) -> bool:
        """True when fit / *_global need patch or word tokens (not just cls / pooled) under this config."""
        return config.image_feature == "mean"

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.state = dict(state)

    def _get(self, name: str, like: Tensor) -> Tensor:
        return self.state[name].to(like.device)


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


# -- the method --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcrustesConfig(BaselineConfig):
    """`dim`: shared dimension after PCA; None means min(Di, Dt) (no reduction for the smaller side)."""

    dim: int | None = None


def procrustes_fit(x: Tensor, y: Tensor, dim: int | None = None) -> dict[str, Tensor]:
    """Means, PCA bases and rotation (float64 maths, float32 results) for paired rows x [N, Di], y [N, Dt]."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xn, yn = F.normalize(x - mean_x, dim=-1), F.normalize(y - mean_y, dim=-1)
    d = min(x.shape[1], y.shape[1]) if dim is None else min(dim, x.shape[1], y.shape[1])
    basis_x, basis_y = pca_basis(xn, d), pca_basis(yn, d)
    u, _, vh = torch.linalg.svd((xn @ basis_x).T @ (yn @ basis_y))
    rotation = u @ vh
    out = {"mean_img": mean_x, "mean_txt": mean_y, "basis_img": basis_x, "basis_txt": basis_y, "rotation": rotation}
    return {k: v.float() for k, v in out.items()}


@register_method("procrustes")
class Procrustes(BaselineAligner):
    """Rotation between mean-centred, L2-normalised (and PCA-reduced) global features."""

    Config = ProcrustesConfig

    @classmethod
    def fit(
        cls, train: Any, val: Any | None, config: ProcrustesConfig, log: Callable[[dict], None],
        unpaired: tuple[ImageRows, TextRows] | None = None,
    ) -> Procrustes:  # fmt: skip
        x, y = gather_pairs(train, config.image_feature, config.seed)
        self = cls(config)
        self.state = procrustes_fit(x, y, config.dim)
        log({"epoch": 0, "pairs": len(x), "dim": int(self.state["rotation"].shape[0])})
        return self

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
