"""Registry of frozen encoders (transformers models): `load_encoder(alias or "hf:<id or path>")`.

One module per family registers its aliases (`dinov2`, `clip`, `sentence`); `provision` builds offline folders and
`local` finds them (imports: base <- local <- registry <- families, provision).
"""

from . import clip, dinov2, sentence  # noqa: F401  (import registers the families)
from .base import EncoderInfo, ImageEncoder, TextEncoder
from .provision import prepare_encoder
from .registry import encoder_names, hub_id, load_encoder

__all__ = [
    "EncoderInfo",
    "ImageEncoder",
    "TextEncoder",
    "encoder_names",
    "hub_id",
    "load_encoder",
    "prepare_encoder",
]
