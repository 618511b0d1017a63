"""Encoder interfaces shared by every family: what the extraction runner calls and what the store records.

An encoder is a frozen transformers model plus the conventions that make its tokens comparable across runs:
which hidden state (`layer`), which tokens are dropped (CLS, registers, [CLS]/[SEP]), how images are resized.
Those choices are written into `EncoderInfo`, which the feature store persists with `dataclasses.asdict`.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from ..errors import PipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 256 / 224  # shortest edge / crop: the DINOv2 (and ImageNet eval) convention
# How a "crop" image becomes the input square (docs/encoders.md): "processor": the model's image processor (short side
# to S * shortest_edge / crop_size, centre crop S, transformers' floor offsets; 256/224 for DINOv2); "short-side":
# timm's eval transform with crop_pct 1.0 (short side to S, centre crop S, torchvision's rounded offsets), which the
# PAL authors ran (src/models/backbones/vision_models.py: data_config["crop_pct"] = 1.0).
CROPS = ("processor", "short-side")
# Which positions of a caption are its tokens: "keep": every attention-mask position, special tokens ([CLS]/[SEP],
# <s></s>) included, as the PAL authors pool them; "drop": the word tokens only (the specials removed).
SPECIAL_TOKENS = ("keep", "drop")
MARKER = "pipe_encoder.json"  # provenance file written into folders that `prepare_encoder` builds
MAX_IMAGE_SIZE = 4096  # pixels; see `check_image_size`
HUB_PROBE_SECONDS = 3.0
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class EncoderInfo:
    """Everything needed to say which features a store holds; persisted with `dataclasses.asdict`. `revision` is the
    weights' identity: the hub revision asked for (None: the hub's default branch), or "sha256:<hex>" of a local
    folder's files (`local.folder_sha256`), so that new weights saved into the same folder are another encoder."""

    alias: str
    model_id: str
    revision: str | None
    weights: str
    modality: str
    dim: int
    layer: str
    image_size: int | None
    patch_size: int | None
    num_register_tokens: int
    pooling: str | None
    max_length: int | None
    compute_dtype: str = "float32"  # the forward's dtype: stores computed in another one are other features
    crop: str | None = None  # image encoders: one of CROPS (None for text encoders)
    special_tokens: str | None = None  # text encoders: one of SPECIAL_TOKENS (None for image encoders)


@dataclass(frozen=True)
class Source:
    """Where the weights come from: a hub id or a local folder, and an honest description of them."""

    alias: str
    model_id: str
    revision: str | None  # hub revision passed to from_pretrained (None for local folders)
    weights: str
    sha256: str | None = None  # local folders: content hash of the files that make the features

    @property
    def identity(self) -> str | None:
        """What the store records as the encoder's `revision`."""
        return f"sha256:{self.sha256}" if self.sha256 else self.revision

    @property
    def is_local(self) -> bool:
        return Path(self.model_id).is_dir()


class HubUnreachable(PipeError):
    """Weights that are neither local nor in the Hugging Face cache, with the hub offline or unreachable."""


@dataclass(frozen=True)
class Options:
    """The user's choices for one `load_encoder` call."""

    layer: str = "last"
    image_size: int | None = None
    max_length: int = 64
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # compute dtype: the weights are loaded in it
    attention: str = "sdpa"  # transformers attn_implementation; models without SDPA keep their default
    crop: str = "processor"  # image encoders: one of CROPS
    special_tokens: str = "keep"  # text encoders: one of SPECIAL_TOKENS


def check_choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    """A named choice, or a one-line PipeError listing the allowed values."""
    if value not in allowed:
        raise PipeError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def resolve_compute_dtype(name: str, device: str | torch.device) -> str:
    """ "auto": bfloat16 on a CUDA device that supports it (what the PAL authors load their text encoder in), else
    float32 (CPU bfloat16 matmuls are slow without AMX, and float16 on CPU slower still); other names as given."""
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16"
        return "float32"
    if name not in COMPUTE_DTYPES:
        raise PipeError(f"--compute-dtype must be auto, {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16 (the name the store records)."""
    return str(dtype).removeprefix("torch.")


def load_model(loader: Any, source: Source, options: Options) -> torch.nn.Module:
    """The frozen model in the compute dtype on the device, with SDPA attention where the model has it (the kernel
    torch picks for the device: flash / memory-efficient on CUDA) and transformers' default otherwise."""
    if options.attention not in ATTENTION:
        raise PipeError(f"attention must be one of {', '.join(ATTENTION)}, got {options.attention!r}")
    try:
        model = load_pretrained(loader, source, "model", dtype=options.dtype, attn_implementation=options.attention)
    except PipeError:
        if options.attention != "sdpa":
            raise
        model = load_pretrained(loader, source, "model", dtype=options.dtype)  # an architecture without SDPA
    return model.eval().requires_grad_(False).to(options.device)


def parse_layer(layer: str | int, num_layers: int) -> int | None:
    """None for "last" (last_hidden_state), else a validated index into hidden_states (num_layers + 1 entries)."""
    text = str(layer).strip()
    if text == "last":
        return None
    try:
        index = int(text)
    except ValueError:
        raise PipeError(f"layer must be 'last' or an integer index into hidden_states, got {layer!r}") from None
    if not -(num_layers + 1) <= index <= num_layers:
        raise PipeError(f"layer {index} out of range: the model has {num_layers + 1} hidden states (-1 = last block)")
    return index


def one_line(error: BaseException) -> str:
    """First non-empty line of an exception message, so PipeError stays one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_image_size(size: int, patch: int | None = None, flag: str = "--image-size") -> int:
    """A positive input size, at most MAX_IMAGE_SIZE, and a multiple of the patch size when it is known (the patch
    embedding silently drops the remainder pixels otherwise). 4096 px is 85k DINOv2 tokens per image: one attention
    matrix of tens of GB and a store row of 130 MB (ViT-B), far beyond any encoder's training size (518 px for
    DINOv2); a bigger value is a typo, refused before anything is allocated."""
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise PipeError(f"{flag} must be between 1 and {MAX_IMAGE_SIZE} pixels, got {size}")
    if patch and size % patch:
        low = max(patch, size - size % patch)
        raise PipeError(f"{flag} {size} is not a multiple of the patch size {patch} (use {low} or {low + patch})")
    return size


@lru_cache(maxsize=1)
def hub_unusable() -> str | None:
    """Why the Hugging Face hub cannot be used (offline mode, no connection), or None. Probed once per process with
    one short TCP connection: huggingface_hub otherwise retries an unreachable hub five times (about 40 s) before
    every failed load. When unusable, hub ids load from the local Hugging Face cache only."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as e:
        return f"cannot reach {host}:{port}: {e.strerror or type(e).__name__}"
    return None


def hub_kwargs(source: Source) -> dict[str, Any]:
    """from_pretrained / cached_file arguments: the revision, and cache-only loading when the hub is unusable."""
    if source.is_local:
        return {}
    return {"revision": source.revision} | ({"local_files_only": True} if hub_unusable() else {})


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers "Loading weights" bar while pipe loads an encoder (`pipe` and `load()` show their own progress);
    the caller's setting is restored afterwards, so importing or using pipe changes nothing in a notebook."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_pretrained(loader: Any, source: Source, what: str, **kwargs: Any) -> Any:
    """Call `loader.from_pretrained`, turning hub/path failures into a one-line PipeError naming the model. Never with
    custom code: trust_remote_code=False, so transformers neither asks on a terminal nor runs a model folder's
    Python; a model that needs it is refused (docs/guarantees.md, "Security")."""
    hub = hub_kwargs(source)
    try:
        with quiet_loading():
            return loader.from_pretrained(source.model_id, **hub, **kwargs, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError) as error:
        if "trust_remote_code" in str(error):
            raise PipeError(
                f"{source.model_id}: its {what} needs the model's own Python code (auto_map), which pipe "
                "never runs; use a model type transformers supports"
            ) from None
        if hub.get("local_files_only"):
            raise HubUnreachable(
                f"cannot load {what} for encoder {source.alias!r}: {source.model_id!r} is not in the "
                f"Hugging Face cache and the hub cannot be used ({hub_unusable()})"
            ) from None
        raise PipeError(
            f"cannot load {what} for encoder {source.alias!r} from {source.model_id!r}: {one_line(error)}"
        ) from error


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The provenance record of a prepared folder, or None for any other folder or a hub id."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ImageEncoder:
    """A frozen vision transformer: `preprocess` PIL images, then `encode` to (cls [B,D], patches [B,P,D])."""

    info: EncoderInfo
    grid: tuple[int, int]

    def __init__(
        self,
        info: EncoderInfo,
        model: torch.nn.Module,
        *,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        crop_ratio: float = EVAL_CROP_RATIO,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.info = info
        self.crop = check_choice(info.crop or "processor", CROPS, "--crop")
        self.model = model
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.crop_ratio = crop_ratio
        self.device = torch.device(device)
        self.dtype = dtype
        size, patch = int(info.image_size or 0), int(info.patch_size or 1)
        self.grid = (size // patch, size // patch)

    def preprocess(self, images: list[Image.Image], resize: str = "crop") -> torch.Tensor:
        """[B,3,S,S] float32. "crop": shortest edge S*ratio then center crop S, where the encoder's `crop` rule
        (CROPS) gives the ratio (the processor's shortest_edge/crop_size: 256/224 for DINOv2, 1 for CLIP; or 1) and
        the crop offsets; "squash": the whole image to SxS, which keeps pixel alignment with segmentation masks.
        Bicubic, mean/std from the processor config."""
        out = self.pixel_buffer(len(images))
        for row, image in enumerate(images):
            out[row] = self.preprocess_one(image, resize)
        return out

    def pixel_buffer(self, n: int) -> torch.Tensor:
        """An uninitialised [n,3,S,S] float32 batch, in pinned host memory when the model is on CUDA (so that the
        copy to the device is asynchronous)."""
        size = int(self.info.image_size or 0)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        return torch.empty(n, 3, size, size, dtype=torch.float32, pin_memory=pin)

    def preprocess_one(self, image: Image.Image, resize: str = "crop") -> torch.Tensor:
        """[3,S,S] float32 of one image (see `preprocess`); PIL and numpy release the GIL, so threads can share it."""
        if resize not in ("crop", "squash"):
            raise PipeError(f"resize must be 'crop' or 'squash', got {resize!r}")
        size = int(self.info.image_size or 0)
        image = image.convert("RGB")
        if resize == "squash":
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        elif self.crop == "short-side":
            image = centre_crop(_resize_shortest_edge(image, size), size, rounded=True)
        else:
            image = centre_crop(_resize_shortest_edge(image, round(size * self.crop_ratio)), size, rounded=False)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    def encode(
        self, pixel_values: torch.Tensor, out_dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls [B,D], patches [B,P,D]) in `out_dtype` on the model's device, registers dropped, patches row-major.
        Pixels travel in float32 (non-blocking from pinned memory) and are cast on the device."""
        with torch.no_grad():
            pixels = pixel_values.to(self.device, non_blocking=True).to(self.dtype)
            cls, patches = self._forward(pixels)
        return cls.to(out_dtype), patches.to(out_dtype)

    def _forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TextEncoder:
    """A frozen text transformer: `encode` texts to (word tokens [B,L,D], length [B], pooled [B,D])."""

    info: EncoderInfo

    def encode(
        self, texts: list[str], out_dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def centre_crop(image: Image.Image, size: int, rounded: bool) -> Image.Image:
    """The centre SxS square. Offsets: transformers' image processors floor (h - S) / 2, torchvision's CenterCrop
    (timm's transform) rounds it half to even; the two differ by a pixel where h - S is odd."""
    width, height = image.size
    if rounded:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_shortest_edge(image: Image.Image, short: int) -> Image.Image:
    """Same output size rule as transformers' `shortest_edge` resize (long side truncated), bicubic."""
    width, height = image.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def processor_settings(processor: Any) -> dict[str, Any]:
    """mean, std, crop ratio and default size from a transformers image processor (any backend)."""
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or IMAGENET_STD))
    size = _as_dict(getattr(processor, "size", None))
    crop = _as_dict(getattr(processor, "crop_size", None))
    crop_side = crop.get("height") or crop.get("shortest_edge")
    ratio = EVAL_CROP_RATIO
    if size.get("shortest_edge") and crop_side and getattr(processor, "do_center_crop", True):
        ratio = float(size["shortest_edge"]) / float(crop_side)
    default = crop_side or size.get("height") or size.get("shortest_edge")
    return {"mean": mean, "std": std, "crop_ratio": ratio, "image_size": int(default) if default else None}


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"shortest_edge": value}
    if isinstance(value, dict):
        return dict(value)
    return {k: getattr(value, k) for k in ("height", "width", "shortest_edge") if getattr(value, k, None)}
