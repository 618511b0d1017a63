"""Regularised CCA and CSA (canonical similarity analysis): closed-form linear alignment by canonical correlations.

CCA finds directions a_i, b_i maximising corr(X a_i, Y b_i) with each side's projections uncorrelated. Closed form:
whiten each side with its ridge-regularised covariance, C_xx + reg * tr(C_xx)/D * I (the ridge is relative to the
mean eigenvalue so `reg` means the same at any feature scale), then take the SVD of the whitened cross-covariance
C_xx^{-1/2} C_xy C_yy^{-1/2} = U S V^T. A = C_xx^{-1/2} U, B = C_yy^{-1/2} V, and the singular values S are the
canonical correlations rho. Embeddings are the top-`rank` canonical coordinates of the centred input, L2-normalised.

CSA (Li, Chinchali, Topcu, ICLR 2025, "CSA: Data-efficient mapping of unimodal features to multimodal features")
fits the same CCA but scores a pair by sum_i rho_i x_i y_i over L2-normalised canonical coordinates, so strongly
correlated directions count more (the authors' `weighted_corr_sim`, rho to the power 1). To keep the interface's
"dot product of normalised outputs" we scale each normalised coordinate by sqrt(rho_i) on both sides (their dot
product is exactly the CSA score) and L2-normalise once more; for a fixed query the extra normalisation rescales each
candidate's score by its own weighted norm, which is the one departure from the published score.

`variant = "pal-authors"` is CSA as the PAL authors ran it (shiwonkim/PAL_working, src/models/alignment/csa.py:131-203,
NormalizedCCA with equal_weights False and use_reg False as configs/csa/vitl_roberta/csa_d512.yaml sets them): cca_zoo's
linear CCA with no regularisation, on each side's principal components that hold 99.9% of its variance (their patch of
cca_zoo's PCA step, src/training/trainers/csa_trainer.py:15-32), and plain cosine between the canonical coordinates
(their retrieval and classification ignore the correlations: csa_trainer.py:381-387, 504-510). Unregularised CCA is
exact whitening of the kept components followed by the SVD above; rank must not exceed the components kept.
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
    TextRows,
    TrainingData,
    l2n,
    register_method,
    saved_size,
)
from .baseline import BaselineConfig, BaselineState, gather_pairs, image_input, linear_embed, text_input

DEFAULT_RANK_CAP = 256
VARIANTS = ("ridge", "pal-authors")
PAL_AUTHORS_PCA_VARIANCE = 0.999  # their PCA(n_components=0.999) before cca_zoo's CCA


@dataclass(frozen=True)
class CCAConfig(BaselineConfig):
    reg: float = field(
        default=1e-3, metadata={"help": "cca, csa: ridge on each covariance, relative to its mean eigenvalue."}
    )
    rank: int | None = field(
        default=None, metadata={"help": "cca, csa: canonical directions kept (default min(Di, Dt, 256))."}
    )
    variant: str = field(
        default="ridge",
        metadata={
            "help": "cca, csa: 'ridge' (reg on each covariance; csa weights by the correlations, as CSA's authors) or "
            "'pal-authors' (the PAL authors' run: 99.9%-variance PCA, no ridge, plain cosine)."
        },
    )

    def check(self) -> None:
        super().check()
        if self.variant not in VARIANTS:
            raise PipeError(f"variant={self.variant!r}: must be one of {', '.join(VARIANTS)}")
        if self.reg < 0:
            raise PipeError(f"reg={self.reg}: must be >= 0")
        if self.rank is not None and self.rank < 1:
            raise PipeError(f"rank={self.rank}: must be >= 1")


def _inv_sqrt(c: Tensor) -> Tensor:
    """Symmetric inverse square root of an SPD matrix (eigenvalues floored so a singular one stays finite)."""
    evals, evecs = torch.linalg.eigh(c)
    floor = evals.max().clamp(min=1e-300) * 1e-12
    return (evecs * evals.clamp(min=floor).rsqrt()) @ evecs.T


def _pca_whitener(c: Tensor, variance: float, side: str) -> Tensor:
    """[D, k] map onto the top-k principal components, each scaled to unit variance, with k the fewest components
    whose share of the variance exceeds `variance` (scikit-learn's PCA(n_components=variance) rule)."""
    evals, evecs = torch.linalg.eigh(c)
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    share = torch.cumsum(evals, 0) / evals.sum()
    k = min(int(torch.searchsorted(share, torch.tensor([variance], dtype=share.dtype), right=True)) + 1, len(evals))
    if not bool((evals[:k] > 0).all()):
        raise PipeError(f"CCA ({side} side): the {side} features have no variance to whiten")
    return evecs[:, :k] * evals[:k].rsqrt()


def cca_fit(
    x: Tensor, y: Tensor, reg: float = 1e-3, rank: int | None = None, pca_variance: float | None = None
) -> dict[str, Tensor]:
    """Means, projections A [Di, r], B [Dt, r] and canonical correlations rho [r] (descending) of paired rows. With
    `pca_variance`, each side is whitened exactly on its principal components holding that share of its variance and
    `reg` is not used (the PAL authors' unregularised CCA)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    if n < 2:
        raise PipeError(f"CCA needs at least 2 pairs, got {n}")
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    cxx, cyy, cxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    dx, dy = cxx.shape[0], cyy.shape[0]
    if pca_variance is None:
        cxx = cxx + reg * torch.trace(cxx) / dx * torch.eye(dx, dtype=x.dtype, device=x.device)
        cyy = cyy + reg * torch.trace(cyy) / dy * torch.eye(dy, dtype=y.dtype, device=y.device)
        wx, wy = _inv_sqrt(cxx), _inv_sqrt(cyy)
    else:
        wx, wy = _pca_whitener(cxx, pca_variance, "image"), _pca_whitener(cyy, pca_variance, "text")
        dx, dy = wx.shape[1], wy.shape[1]
        if rank is not None and rank > min(dx, dy):
            raise PipeError(
                f"rank={rank}: the PCA keeping {pca_variance:.1%} of the variance leaves {dx} image and "
                f"{dy} text components; choose rank <= {min(dx, dy)}"
            )
    u, s, vh = torch.linalg.svd(wx.T @ cxy @ wy, full_matrices=False)
    r = min(rank or DEFAULT_RANK_CAP, dx, dy)
    out = {"mean_img": mean_x, "mean_txt": mean_y, "proj_img": wx @ u[:, :r], "proj_txt": wy @ vh[:r].T, "rho": s[:r]}
    return {k: v.float() for k, v in out.items()}


@register_method("cca")
class CCA(BaselineState, ClosedFormAligner):
    """Top-`rank` canonical coordinates of each side, L2-normalised (every direction weighted equally)."""

    Config = CCAConfig

    @classmethod
    def fit(cls, data: TrainingData, config: CCAConfig, seed: int) -> tuple[CCA, dict[str, Any]]:
        x, y = gather_pairs(data.train, config.image_feature, seed)
        self = cls(config)
        pca = PAL_AUTHORS_PCA_VARIANCE if config.variant == "pal-authors" else None
        self.set_buffers(cca_fit(x, y, config.reg, config.rank, pca_variance=pca))
        rho = self.rho
        return self, {"pairs": len(x), "rank": len(rho), "rho_max": float(rho[0]), "rho_mean": float(rho.mean())}

    @classmethod
    def blank(cls, config: CCAConfig, shapes: dict[str, tuple[int, ...]]) -> CCA:
        """The rank is the fit's (under variant pal-authors it depends on the data's principal components)."""
        di, dt, r = saved_size(shapes, "mean_img", 0), saved_size(shapes, "mean_txt", 0), saved_size(shapes, "rho", 0)
        return cls.with_shapes(
            config, {"mean_img": (di,), "mean_txt": (dt,), "proj_img": (di, r), "proj_txt": (dt, r), "rho": (r,)}
        )

    def _project(self, z: Tensor, side: str) -> Tensor:
        return linear_embed(z, self._get(f"mean_{side}", z), self._get(f"proj_{side}", z), l2_input=False)

    def image_global(self, rows: ImageRows) -> Tensor:
        return self._project(image_input(rows, self.config.image_feature), "img")

    def text_global(self, rows: TextRows) -> Tensor:
        return self._project(text_input(rows), "txt")

    def image_dense(self, patches: Tensor) -> Tensor:
        return self._project(patches, "img")


@register_method("csa")
class CSA(CCA):
    """CCA whose similarity weights canonical direction i by its correlation rho_i (sqrt(rho_i) on each side); under
    variant pal-authors, plain cosine as the PAL authors score it."""

    def _project(self, z: Tensor, side: str) -> Tensor:
        if self.config.variant == "pal-authors":
            return super()._project(z, side)
        weight = self._get("rho", z).clamp(min=0).sqrt()
        return l2n(super()._project(z, side) * weight)
