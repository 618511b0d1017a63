"""CLIP vision tower (openai/clip-vit-base-patch16) and plain ViT.

CLIP: for layer "last" the CLS is the pooler output (post-layernorm CLS, what CLIP projects), the patches are the
rest of `last_hidden_state` (CLIP applies no final norm to them); for an integer layer both come from that
hidden state. The CLIP processor resizes the short side to the crop size (ratio 1), unlike DINOv2's 256/224.
"""

from __future__ import annotations

from .base import Options, Source
from .registry import register, register_types
from .vision import TransformerImageEncoder, build_image_encoder

MODELS = {"clip-vit-b16": "openai/clip-vit-base-patch16"}


@register(MODELS)
@register_types("clip", "clip_vision_model")
def build_clip(source: Source, options: Options) -> TransformerImageEncoder:
    """CLIPVisionModel loads the vision tower from a full CLIP checkpoint or a vision-only one."""
    from transformers import CLIPVisionModel

    return build_image_encoder(source, options, CLIPVisionModel, pooled_cls=True, interpolate_kwarg=True)


@register_types("vit")
def build_vit(source: Source, options: Options) -> TransformerImageEncoder:
    """Plain ViT (CLS + patches, final layernorm inside last_hidden_state)."""
    from transformers import AutoModel

    return build_image_encoder(source, options, AutoModel, interpolate_kwarg=True)
