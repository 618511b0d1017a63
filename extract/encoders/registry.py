"""Alias -> (hub id, builder) registry. Each family module registers its aliases with `@register`, and the model
types it can build with `@register_types`, so `hf:<id or path>` reaches the same builder as the named aliases. Both are
`extract.registry.Registry`s (an alias or model type is registered once; an unknown alias lists the valid ones); the
family modules are imported by name in extract/encoders/__init__.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import PipeError
from ..registry import Registry
from .base import (
    COMPUTE_DTYPES,
    HubUnreachable,
    ImageEncoder,
    Options,
    Source,
    TextEncoder,
    check_image_size,
    load_pretrained,
    read_marker,
    resolve_compute_dtype,
)
from .local import folder_sha256, local_source, offline_hint

Encoder = ImageEncoder | TextEncoder
Builder = Callable[[Source, Options], Encoder]


class Alias(NamedTuple):
    model_id: str  # the hub id the alias stands for
    builder: Builder


ENCODERS: Registry[Alias] = Registry("encoder", hint="or hf:<model id or path>")
MODEL_TYPES: Registry[Builder] = Registry("model type")  # transformers `config.model_type` -> builder (hf: names)
TEXT_FALLBACK: Registry[Builder] = Registry("text fallback")  # "text": the builder of every non-vision model type


def register(models: dict[str, str]) -> Callable[[Builder], Builder]:
    """Register a builder for aliases -> hub ids."""

    def decorate(builder: Builder) -> Builder:
        for alias, model_id in models.items():
            ENCODERS.register(alias, Alias(model_id, builder))
        return builder

    return decorate


def register_types(*model_types: str, text_fallback: bool = False) -> Callable[[Builder], Builder]:
    """Register a builder for transformers `config.model_type`s reached through `hf:`; `text_fallback` marks the
    builder used for every non-vision model type (there is one)."""

    def decorate(builder: Builder) -> Builder:
        for model_type in model_types:
            MODEL_TYPES.register(model_type, builder)
        if text_fallback:
            TEXT_FALLBACK.register("text", builder)
        return builder

    return decorate


def encoder_names() -> list[str]:
    """Registered aliases (sorted); anything else goes through `hf:<model id or local path>`."""
    return ENCODERS.names()


def hub_id(alias: str) -> str:
    """The hub id a registered alias stands for."""
    return ENCODERS.get(alias).model_id


def load_encoder(
    name: str,
    *,
    layer: str = "last",
    image_size: int | None = None,
    max_length: int = 64,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    attention: str = "sdpa",
    crop: str = "processor",
    special_tokens: str = "keep",
) -> Encoder:
    """Load a frozen encoder by alias or `hf:<model id or local path>[@revision]`, in eval mode on `device`; `dtype`
    is the compute dtype (a torch dtype, or a name: float32, bfloat16, float16, auto). `crop` applies to image
    encoders, `special_tokens` to text encoders (base.CROPS, base.SPECIAL_TOKENS)."""
    if isinstance(dtype, str):
        dtype = COMPUTE_DTYPES[resolve_compute_dtype(dtype, device)]
    options = Options(
        layer=str(layer),
        image_size=image_size,
        max_length=max_length,
        device=device,
        dtype=dtype,
        attention=attention,
        crop=crop,
        special_tokens=special_tokens,
    )
    return build_encoder(resolve_source(name), options)


def resolve_source(name: str) -> Source:
    """Where an alias or `hf:` name's weights are, and their identity (a local folder's content hash: cheap after
    the first call while the files are unchanged). Loads nothing."""
    name = name.strip()
    if name.startswith("hf:"):
        return _hf_source(name)
    model_id = ENCODERS.get(name).model_id
    return local_source(name) or Source(name, model_id, None, model_id)


def build_encoder(source: Source, options: Options) -> Encoder:
    """Load the weights a resolved source points at; a hub that cannot be used says how to get them offline."""
    if options.max_length < 1:
        raise PipeError(f"--max-length must be at least 1, got {options.max_length}")
    if options.image_size is not None:
        check_image_size(options.image_size)
    try:
        if source.alias.startswith("hf:"):
            return _builder_for_config(source)(source, options)
        return ENCODERS.get(source.alias).builder(source, options)
    except HubUnreachable as e:
        raise PipeError(f"{e}; {offline_hint(source.alias)}") from None


def _hf_source(name: str) -> Source:
    """`hf:owner/name[@rev]` or `hf:/some/folder`; a path-like target that does not exist is a PipeError."""
    target = name[3:].strip()
    if not target:
        raise PipeError("hf: needs a model id or a local folder, e.g. hf:facebook/dinov2-small or hf:./my-model")
    path = Path(target).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipeError(f"model folder {str(path)!r} has no config.json")
        marker = read_marker(path) or {}
        folder = path.resolve()
        return Source(name, str(folder), None, str(marker.get("weights") or folder), folder_sha256(folder))
    if target.startswith(("/", "./", "../", "~", ".\\")) or target.count("/") > 1 or "\\" in target:
        raise PipeError(f"model folder {target!r} does not exist")
    model_id, _, revision = target.partition("@")
    return Source(name, model_id, revision or None, target)


def _builder_for_config(source: Source) -> Builder:
    """Pick the family from the config: registered vision types -> image builders, other vision -> error,
    everything else -> the text builder."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, source, "config")
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES.get(model_type)
    if getattr(config, "vision_config", None) is not None or hasattr(config, "patch_size"):
        vision = [t for t, b in MODEL_TYPES.items() if b not in TEXT_FALLBACK.values()]
        raise PipeError(
            f"vision model type {model_type!r} of {source.model_id!r} is not supported; supported: {', '.join(vision)}"
        )
    if "text" not in TEXT_FALLBACK:
        raise PipeError("no text encoder family registered")
    return TEXT_FALLBACK.get("text")
