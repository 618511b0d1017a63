"""DINOv2 family (facebook/dinov2-*, with and without registers).

transformers' Dinov2 sequence is CLS, then `num_register_tokens` registers (the -reg models), then the patches;
position embeddings are always interpolated, so any image size works (grid = S // 14).
"""

from __future__ import annotations

from .base import Options, Source
from .registry import register, register_types
from .vision import TransformerImageEncoder, build_image_encoder

SIZES = ("small", "base", "large", "giant")
MODELS = {"dinov2": "facebook/dinov2-base"}
MODELS.update({f"dinov2-{size}": f"facebook/dinov2-{size}" for size in SIZES})
MODELS.update({f"dinov2-{size}-reg": f"facebook/dinov2-with-registers-{size}" for size in SIZES})


@register(MODELS)
@register_types("dinov2", "dinov2_with_registers")
def build_dinov2(source: Source, options: Options) -> TransformerImageEncoder:
    """AutoModel picks Dinov2Model or Dinov2WithRegistersModel from the config."""
    from transformers import AutoModel

    return build_image_encoder(source, options, AutoModel)
