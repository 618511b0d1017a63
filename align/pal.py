"""PAL: projection-free anchor learning (arXiv 2605.16834). Only the two anchor banks are trained.

Each token is represented by its cosine similarities to K anchors of its own modality; per anchor, a softmax over
tokens (temperature tau_p) pools those similarities into a K-dim profile; image and text profiles, L2-normalised,
meet in a symmetric InfoNCE at temperature tau. The profile computation is `pipe_align.align.kernel.anchor_profiles`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipe_align.extract.errors import PipeError

from . import pal_presets
from .base import (
    ImageRows,
    Plan,
    StepContext,
    TextRows,
    TrainedAligner,
    TrainedConfig,
    TrainingData,
    l2n,
    register_method,
    saved_size,
)
from .ddp import DataParallel
from .kernel import anchor_profiles
from .loop import RunConfig
from .losses import info_nce


@dataclass(frozen=True)
class PALConfig(TrainedConfig):
    """Defaults: the PAL authors' recipe as their code runs it (shiwonkim/PAL_working: configs/default.yaml,
    configs/pal/*/token_k512.yaml, alignment_trainer.py), which `pipe align --preset paper` uses unchanged with
    `PAL.run_defaults` (1000 epochs, batch 4096, patience 200): K=512, tau_p 0.03, tau 0.05, CLS + patch tokens
    pooled, AdamW lr 1e-3 (replaced by the pick of a 100-iteration LR finder from 1e-7 to 10), betas (0.9, 0.95),
    weight decay 1e-4, per-batch CosineAnnealingLR with T_max = 50 x max(1, pairs // batch) steps and no warm-up, each
    anchor bank's gradient norm clipped to 1.0 on its own. They are tuned for about 83k pairs; the presets in
    `align.pal_presets` (docs/align.md) say what `pipe align` uses on a few hundred."""

    anchors: int = field(default=512, metadata={"help": "pal: anchors per modality K."})
    tau_p: float = field(default=0.03, metadata={"help": "pal: pooling temperature over tokens."})
    tau: float = field(default=0.05, metadata={"help": "pal: InfoNCE temperature."})
    use_cls: bool = field(
        default=True,
        metadata={
            "help": "pal: pool the image CLS token with the patches (training and global embeddings; dense decoding "
            "always uses patches)."
        },
    )
    profile: str = field(
        default="tokens",
        metadata={
            "help": "pal: tokens (each token's similarity vector, pooled over tokens per anchor: the method) or pooled "
            "(the pooled control: one mean token per image and per caption, its anchor similarities as the "
            "profile; docs/claims.md)."
        },
    )
    beta2: float = 0.95
    schedule: str = "cosine_cycle"
    grad_clip: float = 1.0
    grad_clip_mode: str = "per_group"
    lr_finder: int = 100
    lr_finder_draw: str = "subset"
    limits: ClassVar[dict[str, tuple[int | None, int]]] = {"anchors": (1, 65_536)}

    def check(self) -> None:
        checks = {
            "anchors": self.anchors >= 1,
            "tau_p": self.tau_p > 0,
            "tau": self.tau > 0,
            "profile": self.profile in PROFILES,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise PipeError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad))


PROFILES = ("tokens", "pooled")


def pooled_view(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The pooled control's input: the mean of the valid tokens as the one token of each row ([N, 1, D], mask)."""
    m = mask.to(tokens.dtype)[..., None]
    mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
    return mean[:, None, :], torch.ones(mean.shape[0], 1, dtype=torch.bool, device=tokens.device)


def image_token_view(rows: ImageRows, use_cls: bool) -> tuple[Tensor, Tensor]:
    """Tokens [N, T, D] and mask [N, T] of the image side (patches, optionally CLS first)."""
    tokens = rows.patches if not use_cls else torch.cat([rows.cls[:, None, :], rows.patches], dim=1)
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


class AnchorProfiles:
    """PAL's model over two anchor banks `image_anchors`, `text_anchors` [K, D] (a trained PAL's parameters, or
    pal-fixed's buffers) and the config's `tau_p`, `use_cls` and (where it has one) `profile`."""

    image_anchors: Tensor
    text_anchors: Tensor

    def image_profiles(self, rows: ImageRows, anchors: Tensor | None = None) -> Tensor:
        tokens, mask = image_token_view(rows, self.config.use_cls)
        if getattr(self.config, "profile", "tokens") == "pooled":
            tokens, mask = pooled_view(tokens, mask)
        a = self.image_anchors if anchors is None else anchors
        return anchor_profiles(tokens, mask, a, self.config.tau_p)

    def text_profiles(self, rows: TextRows, anchors: Tensor | None = None) -> Tensor:
        a = self.text_anchors if anchors is None else anchors
        tokens, mask = rows.tokens, rows.mask()
        if getattr(self.config, "profile", "tokens") == "pooled":
            tokens, mask = pooled_view(tokens, mask)
        return anchor_profiles(tokens, mask, a, self.config.tau_p)

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

    @classmethod
    def blank(cls, config: PALConfig, shapes: dict[str, tuple[int, ...]]) -> AnchorProfiles:
        """K from the config, each bank's input dim from the saved tensors."""
        image_dim, text_dim = saved_size(shapes, "image_anchors", 1), saved_size(shapes, "text_anchors", 1)
        out = cls(config)
        out.set_anchors(torch.empty(config.anchors, image_dim), torch.empty(config.anchors, text_dim))
        return out


@register_method("pal")
class PAL(AnchorProfiles, TrainedAligner):
    Config = PALConfig
    needs_tokens = True
    weights_file = "anchors.safetensors"
    run_defaults = {"epochs": 1000, "batch_size": 4096, "patience": 200}
    presets = pal_presets.PRESETS
    preset_help = pal_presets.SMALL_HELP

    # -- presets (align/pal_presets.py: auto, paper, small) ---------------------------------------------------------
    @classmethod
    def preset_plan(cls, preset: str | None, params: dict[str, Any], run: RunConfig, n_train: int) -> Plan | None:
        return pal_presets.plan(cls, preset, params, run, n_train)

    @classmethod
    def preset_search(
        cls,
        preset: str,
        params: dict[str, Any],
        run: RunConfig,
        data: TrainingData,
        dp: DataParallel | None = None,
        say: bool = False,
    ) -> Plan:
        return pal_presets.search_small(cls, params, run, data, preset, dp=dp, say=say)

    def __init__(
        self, config: PALConfig, image_dim: int | None = None, text_dim: int | None = None, seed: int = 0
    ) -> None:
        """With both dims: anchors at their initial draw for `seed` (an untrained PAL); without: none until `setup`
        or a load (`load_aligner`) creates them."""
        super().__init__(config)
        self.register_parameter("image_anchors", None)
        self.register_parameter("text_anchors", None)
        if image_dim and text_dim:
            self.init_anchors(image_dim, text_dim, seed)

    def set_anchors(self, image: Tensor, text: Tensor) -> None:
        """Both banks as the trained parameters (image first: the order of `parameters()` and the checkpoint)."""
        self.image_anchors, self.text_anchors = nn.Parameter(image), nn.Parameter(text)

    def init_anchors(self, image_dim: int, text_dim: int, seed: int, device: str | torch.device = "cpu") -> None:
        """N(0, 1) anchors, L2-normalised, drawn from `seed` (image bank first)."""
        g = torch.Generator().manual_seed(seed)
        image = l2n(torch.randn(self.config.anchors, image_dim, generator=g))
        text = l2n(torch.randn(self.config.anchors, text_dim, generator=g))
        self.set_anchors(image.to(device), text.to(device))

    @torch.no_grad()
    def word_patch_scores(self, patches: Tensor, tokens: Tensor) -> Tensor:
        """cos(R_text[t], R_image[p]): each word token's similarity vector over the text anchors against each patch's
        over the image anchors (anchor k of one bank is paired with anchor k of the other by the loss)."""
        r_img = l2n(l2n(patches) @ l2n(self.image_anchors).T.to(patches.device))
        r_txt = l2n(l2n(tokens) @ l2n(self.text_anchors).T.to(tokens.device))
        return r_txt @ r_img.transpose(1, 2)

    # -- training (align.loop drives it) ----------------------------------------------------------------------------
    def setup(self, data: TrainingData, seed: int) -> None:
        lay_i, lay_t = data.train.stores.image.layout, data.train.stores.text.layout
        self.init_anchors(lay_i.dim, lay_t.dim, seed, data.train.device)

    def param_groups(self) -> list[list[Tensor]]:
        return [[self.image_anchors], [self.text_anchors]]  # clipped one by one, as the authors clip each bank

    def loss(self, batch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        h_img = ctx.gather(l2n(self.image_profiles(batch.image)), batch.sizes)
        h_txt = ctx.gather(l2n(self.text_profiles(batch.text)), batch.sizes)
        return info_nce(h_img, h_txt, self.config.tau), {}

    @property
    def val_temperature(self) -> float:
        return self.config.tau
