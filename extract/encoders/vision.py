"""Shared machinery for ViT-style image encoders (CLS first, optional register tokens, then the patch grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import PipeError
from .base import (
    CROPS,
    EncoderInfo,
    ImageEncoder,
    Options,
    Source,
    check_choice,
    check_image_size,
    dtype_name,
    load_model,
    load_pretrained,
    parse_layer,
    processor_settings,
)


class TransformerImageEncoder(ImageEncoder):
    """One forward, then split the sequence into CLS, registers (dropped) and the row-major patch grid."""

    def __init__(
        self,
        info: EncoderInfo,
        model: torch.nn.Module,
        *,
        layer_index: int | None,
        prefix: int,
        pooled_cls: bool,
        native_size: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(info, model, **kwargs)
        self.layer_index = layer_index
        self.prefix = prefix  # CLS + register tokens ahead of the patches
        self.pooled_cls = pooled_cls  # CLIP: the CLS of "last" is the post-layernorm pooler output
        self.native_size = native_size  # position table size; other sizes need interpolation kwargs for some models
        self.interpolate_kwarg = False

    def _forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = pixel_values.shape[-2:]
        patch = int(self.info.patch_size or 1)
        kwargs: dict[str, Any] = {}
        if self.interpolate_kwarg and (height != self.native_size or width != self.native_size):
            kwargs["interpolate_pos_encoding"] = True
        hidden = self.layer_index is not None
        out = self.model(pixel_values=pixel_values, output_hidden_states=hidden, **kwargs)
        states = out.hidden_states[self.layer_index] if hidden else out.last_hidden_state
        patches = states[:, self.prefix :]
        expected = (height // patch) * (width // patch)
        if patches.shape[1] != expected:
            raise PipeError(f"encoder {self.info.alias!r} gave {patches.shape[1]} patch tokens, expected {expected}")
        cls = out.pooler_output if self.pooled_cls and not hidden else states[:, 0]
        return cls, patches


def build_image_encoder(
    source: Source, options: Options, model_class: Any, *, pooled_cls: bool = False, interpolate_kwarg: bool = False
) -> TransformerImageEncoder:
    """Load model and processor settings through transformers, then wrap them; used by every vision family."""
    model = load_model(model_class, source, options)
    config = model.config
    settings = _processor(source)
    patch = int(config.patch_size)
    size = int(options.image_size or settings["image_size"] or config.image_size)
    check_image_size(size, patch, "--image-size" if options.image_size else f"the default image size of {source.alias}")
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    info = EncoderInfo(
        alias=source.alias,
        model_id=source.model_id,
        revision=source.identity,
        weights=source.weights,
        modality="image",
        dim=int(config.hidden_size),
        layer=_layer_name(options.layer, int(config.num_hidden_layers)),
        image_size=size,
        patch_size=patch,
        num_register_tokens=registers,
        pooling=None,
        max_length=None,
        compute_dtype=dtype_name(options.dtype),
        crop=check_choice(options.crop, CROPS, "--crop"),
    )
    encoder = TransformerImageEncoder(
        info,
        model,
        layer_index=parse_layer(options.layer, int(config.num_hidden_layers)),
        prefix=1 + registers,
        pooled_cls=pooled_cls,
        native_size=int(config.image_size),
        mean=settings["mean"],
        std=settings["std"],
        crop_ratio=settings["crop_ratio"],
        device=options.device,
        dtype=options.dtype,
    )
    encoder.interpolate_kwarg = interpolate_kwarg
    return encoder


def _layer_name(layer: str, num_layers: int) -> str:
    """Normalised layer string for the store ("last" or the integer as given)."""
    index = parse_layer(layer, num_layers)
    return "last" if index is None else str(index)


def _processor(source: Source) -> dict[str, Any]:
    """Processor settings; a local folder without preprocessor_config.json gets the DINOv2/ImageNet defaults."""
    folder = Path(source.model_id)
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        return processor_settings(None)
    from transformers import AutoImageProcessor

    return processor_settings(load_pretrained(AutoImageProcessor, source, "image processor"))
