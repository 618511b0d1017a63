"""Registry of frozen encoders (transformers models): `load_encoder(alias or "hf:<id or path>")`.

One module per family registers its aliases (`dinov2`, `clip`, `sentence`); `provision` builds offline folders and
`local` finds them (imports: base <- local <- registry <- families, provision).
"""

from pipe_align.extract.encoders import clip, dinov2, sentence  # noqa: F401  (import registers the families)
from pipe_align.extract.encoders.base import EncoderInfo, ImageEncoder, TextEncoder
from pipe_align.extract.encoders.provision import prepare_encoder
from pipe_align.extract.encoders.registry import encoder_names, hub_id, load_encoder

__all__ = [
    "EncoderInfo",
    "ImageEncoder",
    "TextEncoder",
    "encoder_names",
    "hub_id",
    "load_encoder",
    "prepare_encoder",
]
