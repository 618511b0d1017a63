"""Use a trained alignment on your own images and words: `model = load(run_dir)`.

`load` rebuilds the two frozen encoders a run was trained on, exactly as they were extracted (alias, layer, image
size, resize rule, text length; the same `load_encoder` and the same `ImageEncoder.preprocess` as `pipe extract`),
checks that they are the same weights, and loads the fitted method. The encoders compute in the dtype the training
stores record (`encoder.compute_dtype`: bfloat16 for a store extracted on a GPU with `--compute-dtype auto`), and
features are rounded to the stores' precision (float16) before the method sees them, so the API computes what
`pipe eval` computes from stores.

    model = load("demo-out/runs/pal-k512")
    img = model.encode_image(["cat.jpg", pil_image])        # [N, E], L2-normalised, on model.device
    txt = model.encode_text(["a photo of a cat"])           # [M, E]
    model.classify(images, ["cat", "dog"])                  # [N, C] cosine scores against template-averaged labels
    seg = model.segment("street.jpg", ["car", "road"])      # label map at the image's size, score maps
    model.similarity(images, texts)                         # [N, M]
    model.anchor_maps("cat.jpg")                            # PAL: where its most active anchors fire

Everything goes through the `Aligner` interface, so every method works; segmentation decodes like `pipe eval
segmentation` (evaluate.segmentation.patch_scores, upsample_argmax; evaluate.background for its rules).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pipe_align.align.base import Aligner, ImageRows, TextRows
from pipe_align.align.methods import load_aligner
from pipe_align.evaluate.background import decode
from pipe_align.evaluate.context import read_run
from pipe_align.evaluate.diagnostics import anchors_of
from pipe_align.evaluate.metrics import zero_shot_classifier
from pipe_align.evaluate.segmentation import patch_scores
from pipe_align.extract.datasets.base import CLIP_TEMPLATES, UnreadableImage, is_blank, open_rgb
from pipe_align.extract.encoders import load_encoder
from pipe_align.extract.encoders.base import COMPUTE_DTYPES, resolve_compute_dtype
from pipe_align.extract.errors import PipeError
from pipe_align.extract.remote import location
from pipe_align.extract.runtime import prefetch, resolve_device
from pipe_align.extract.store import read_json_attrs, recorded_encoder

from . import threads

ImageInput = str | Path | Image.Image | Tensor
# Loaded encoder attributes that must equal the recorded ones (model_id is left out: a prepared folder's path
# differs between machines while its weights, named in `weights`, are the same).
MUST_MATCH = (
    "weights",
    "revision",
    "dim",
    "layer",
    "patch_size",
    "num_register_tokens",
    "pooling",
    "image_size",
    "max_length",
    "crop",
    "special_tokens",
)
# `load(compute_dtype=...)`: "store" (the training stores' recorded compute dtype), or what `pipe extract
# --compute-dtype` takes ("auto": extraction's device rule; a dtype name).
COMPUTE_CHOICES = ("store", "auto", *COMPUTE_DTYPES)
DEFAULT_BACKGROUND = "background"
CLASSIFIERS_KEPT = 8  # label sets whose class weights are kept


@dataclass(frozen=True)
class EncoderSpec:
    """How one encoder of a run is rebuilt, from run.json's `encoders` record or the store it was trained on."""

    modality: str
    alias: str
    recorded: dict[str, Any]  # the store's encoder attributes (+ dtype, and resize/grid for images)
    source: str  # where they were read (for error messages)

    @property
    def dtype(self) -> str:
        return str(self.recorded.get("dtype") or "float16")


def encoder_specs(run: Path, meta: dict[str, Any]) -> tuple[EncoderSpec, EncoderSpec]:
    """(image, text) specs; a run dir that does not say enough to rebuild an encoder is a one-line error."""
    need = {"image": ("layer", "image_size", "resize"), "text": ("layer", "max_length")}
    specs = []
    for modality in ("image", "text"):
        recorded, source = _recorded_encoder(run, meta, modality)
        missing = [k for k in need[modality] if recorded.get(k) is None]
        if missing:
            store = meta.get(f"{modality}_store")
            raise PipeError(
                f"run {run}: cannot rebuild its {modality} encoder: {', '.join(missing)} not recorded "
                f"(run.json has no 'encoders' entry and its {modality} store {store} is not found)"
            )
        specs.append(EncoderSpec(modality, str(meta[f"{modality}_encoder"]), recorded, source))
    return specs[0], specs[1]


def _recorded_encoder(run: Path, meta: dict[str, Any], modality: str) -> tuple[dict[str, Any], str]:
    """run.json `encoders` (written by `pipe align` since it records them), else the training store's attributes
    (its path as recorded, which is relative to where `pipe align` ran: tried as given and below each parent of the
    run dir), else what run.json says at its top level."""
    enc = (meta.get("encoders") or {}).get(modality)
    if isinstance(enc, dict):
        return dict(enc), f"{run}/run.json"
    store = meta.get(f"{modality}_store")
    if isinstance(store, str):
        given = location(store)
        tries = [given] if given.is_absolute() else [given, *(p / given for p in run.resolve().parents)]
        for path in tries:
            if (path / "zarr.json").is_file():
                attrs = read_json_attrs(path)
                extra = {"resize": attrs.get("resize"), "grid": attrs.get("grid")} if modality == "image" else {}
                return dict(attrs.get("encoder") or {}) | {"dtype": attrs.get("dtype")} | extra, str(path)
    return {"layer": meta.get(f"{modality}_layer"), "weights": meta.get(f"{modality}_weights")}, f"{run}/run.json"


def check_compute_choice(choice: str, flag: str = "compute_dtype") -> str:
    """One of COMPUTE_CHOICES, or a one-line PipeError naming the option."""
    if choice not in COMPUTE_CHOICES:
        raise PipeError(f"{flag} must be one of {', '.join(COMPUTE_CHOICES)}, got {choice!r}")
    return choice


def apply_compute_dtype(spec: EncoderSpec, choice: str, device: str, run: Path | None = None) -> str:
    """The dtype a rebuilt encoder computes in. "store": the one `pipe extract` computed the training store in, as
    the store records it (`encoder.compute_dtype`; a store from before that record was computed in float32, the only
    compute dtype then: `store.recorded_encoder`), so the method sees the features it was fitted on. Any other
    choice goes through extraction's own rule (`resolve_compute_dtype`: "auto" is bfloat16 on a CUDA device that
    has it, else float32), the one function that decides it for both."""
    check_compute_choice(choice)
    if choice != "store":
        return resolve_compute_dtype(choice, device)
    recorded = recorded_encoder(spec.recorded, spec.modality)["compute_dtype"]
    if recorded not in COMPUTE_DTYPES:
        where = f"run {run}: " if run is not None else ""
        raise PipeError(
            f"{where}its {spec.modality} encoder record ({spec.source}) has compute_dtype {recorded!r}, "
            f"expected one of {', '.join(COMPUTE_DTYPES)}"
        )
    return str(recorded)


def build_encoder(spec: EncoderSpec, run: Path, device: str, compute_dtype: str = "store"):
    """The frozen encoder of `spec` through `load_encoder` (as `pipe extract` loads it: the weights loaded in the
    compute dtype, no autocast), checked against the record."""
    r = recorded_encoder(spec.recorded, spec.modality)
    dtype = apply_compute_dtype(spec, compute_dtype, device, run)
    try:
        enc = load_encoder(
            spec.alias,
            layer=str(r["layer"]),
            image_size=r.get("image_size"),
            max_length=int(r.get("max_length") or 64),
            device=device,
            dtype=dtype,
            crop=r.get("crop") or "processor",
            special_tokens=r.get("special_tokens") or "keep",
        )
    except PipeError as e:
        raise PipeError(f"run {run}: cannot load its {spec.modality} encoder {spec.alias!r} ({e})") from None
    got = asdict(enc.info)
    if got["modality"] != spec.modality:
        raise PipeError(f"run {run}: {spec.alias!r} loads a {got['modality']} encoder, expected {spec.modality}")
    for key in MUST_MATCH:
        if r.get(key) is not None and str(got.get(key)) != str(r[key]):
            raise PipeError(
                f"run {run}: its {spec.modality} encoder {spec.alias!r} had {key}={r[key]!r} "
                f"({spec.source}) but loads with {key}={got.get(key)!r} here"
            )
    return enc


def load(run: str | Path, device: str = "auto", batch_size: int = 32, compute_dtype: str = "store") -> AlignedModel:
    """The trained alignment of a run dir with its two frozen encoders, ready to apply (see the module docstring).
    `compute_dtype`: "store" (default) runs each encoder in the dtype its training store was computed in; "auto",
    "float32", "bfloat16" or "float16" as `pipe extract --compute-dtype` (faster or more precise, other features)."""
    threads.check()  # the thread policy was applied when pipe_align.pipelines was imported (docs/kernel.md)
    run = Path(run)
    check_compute_choice(compute_dtype)
    meta = read_run(run)
    if meta.get("complete") is False:
        raise PipeError(f"run {run}: training has not finished (run.json says complete: false)")
    if batch_size < 1:
        raise PipeError(f"batch_size must be >= 1, got {batch_size}")
    image_spec, text_spec = encoder_specs(run, meta)
    device = resolve_device(device)
    for spec in (image_spec, text_spec):  # a bad record is refused before any weights load
        apply_compute_dtype(spec, compute_dtype, device, run)
    aligner = load_aligner(run, device=device)
    image_encoder = build_encoder(image_spec, run, device, compute_dtype)
    text_encoder = build_encoder(text_spec, run, device, compute_dtype)
    return AlignedModel(run, meta, aligner, image_encoder, text_encoder, image_spec, text_spec, device, batch_size)


@dataclass
class Segmentation:
    """`labels` [H, W] int64: index into `names` per pixel, at the image's size; `scores` [C, h, w]: class scores on
    the patch grid (what the maps are upsampled from); `background`: the index of the background prompt or None."""

    labels: Tensor
    names: list[str]
    scores: Tensor
    background: int | None
    threshold: float | None = None
    bias: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.labels.shape)

    def score_map(self, label: str | int) -> Tensor:
        """[H, W] scores of one label (a name, or its index into `names`), bilinearly upsampled to the image as the
        argmax sees them."""
        if isinstance(label, str) and label in self.names:
            c = self.names.index(label)
        elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(self.names):
            c = int(label)
        else:  # a negative index would slice an empty map, an unknown name would raise a bare ValueError
            raise PipeError(
                f"score_map: label {label!r} is not one of this segmentation's labels "
                f"({', '.join(self.names)}) or their indices 0..{len(self.names) - 1}"
            )
        return F.interpolate(self.scores[None, c : c + 1], size=self.size, mode="bilinear", align_corners=False)[0, 0]


@dataclass
class AnchorMaps:
    """PAL: the `anchors` of largest profile value for an image, those `values`, and their cosine maps [k, h, w]."""

    anchors: list[int]
    values: list[float]
    maps: Tensor


class AlignedModel:
    """Two frozen encoders and a fitted alignment method. Built by `load`; every output is on `self.device`."""

    def __init__(
        self,
        run: Path,
        meta: dict[str, Any],
        aligner: Aligner,
        image_encoder,
        text_encoder,
        image_spec: EncoderSpec,
        text_spec: EncoderSpec,
        device: str,
        batch_size: int,
    ) -> None:
        self.run, self.meta, self.aligner = run, meta, aligner
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_spec, self.text_spec = image_spec, text_spec
        self.device, self.batch_size = device, batch_size
        self.resize = str(image_spec.recorded["resize"])  # the extraction's rule: what the method was fitted on
        self._classifiers: dict[tuple, Tensor] = {}

    @property
    def method(self) -> str:
        return self.aligner.name

    @property
    def compute_dtypes(self) -> dict[str, str]:
        """The dtype each encoder computes in, {"image": ..., "text": ...} (`load`'s `compute_dtype`)."""
        return {"image": self.image_encoder.info.compute_dtype, "text": self.text_encoder.info.compute_dtype}

    # -- features ---------------------------------------------------------------------------------------------------
    def _batches(self, images: list, resize: str, skip: bool) -> Iterator[tuple[Tensor | None, list[int], list]]:
        """(pixels, positions in `images`, skipped (position, reason)) per batch; decoding and preprocessing run
        `prefetch`ed in a thread ahead of the encoder, as in `pipe extract`."""

        def produce():
            for b0 in range(0, len(images), self.batch_size):
                pil, kept, bad = [], [], []
                for i in range(b0, min(b0 + self.batch_size, len(images))):
                    try:
                        pil.append(as_pil(images[i]))
                        kept.append(i)
                    except UnreadableImage as e:
                        if not skip and (isinstance(images[i], (str, Path)) or len(images) == 1):
                            raise  # a path names itself
                        if not skip:  # an in-memory image is named by its position
                            raise UnreadableImage(f"images[{i}]: {e}") from None
                        bad.append((i, str(e)))
                yield (self.image_encoder.preprocess(pil, resize=resize) if pil else None), kept, bad

        return prefetch(produce(), depth=2)

    def _image_rows(self, pixels: Tensor, patches: bool = True) -> ImageRows:
        cls, pt = self.image_encoder.encode(pixels)
        dtype = self.image_spec.dtype
        return ImageRows(cls=like_store(cls, dtype), patches=like_store(pt, dtype) if patches else None)

    def image_features(self, images: ImageInput | Sequence[ImageInput], resize: str | None = None) -> ImageRows:
        """The frozen encoder's rows (CLS [N, D], patches [N, P, D]), rounded like the training store."""
        items = as_list(images)
        rows = [self._image_rows(px) for px, _, _ in self._batches(items, resize or self.resize, skip=False)]
        return ImageRows(cls=torch.cat([r.cls for r in rows]), patches=torch.cat([r.patches for r in rows]))

    def text_features(self, texts: str | Sequence[str]) -> TextRows:
        """The frozen text encoder's rows (pooled, word tokens, lengths), rounded like the training store."""
        texts = check_texts(texts)
        parts = []
        for b0 in range(0, len(texts), self.batch_size):
            tokens, length, pooled = self.text_encoder.encode(texts[b0 : b0 + self.batch_size])
            parts.append((like_store(tokens, self.text_spec.dtype), length, like_store(pooled, self.text_spec.dtype)))
        return TextRows(
            pooled=torch.cat([p[2] for p in parts]),
            tokens=torch.cat([p[0] for p in parts]),
            length=torch.cat([p[1] for p in parts]),
        )

    # -- embeddings -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(
        self, images: ImageInput | Sequence[ImageInput], on_images: Callable[[int], None] | None = None
    ) -> Tensor:
        """[N, E] aligned, L2-normalised image embeddings; an unreadable image is a PipeError naming it."""
        emb, _, _ = self.encode_files(as_list(images), skip_unreadable=False, on_images=on_images)
        return emb

    @torch.no_grad()
    def encode_files(
        self, images: Sequence[ImageInput], skip_unreadable: bool = True, on_images: Callable[[int], None] | None = None
    ) -> tuple[Tensor, list[int], list[tuple[int, str]]]:
        """(embeddings of the readable images, their positions in `images`, skipped (position, reason)): for
        folders, where one bad file should not stop the rest (as `pipe extract` skips it)."""
        out, kept, skipped = [], [], []
        tokens = self.aligner.needs_tokens
        for pixels, k, bad in self._batches(list(images), self.resize, skip_unreadable):
            if pixels is not None:
                out.append(self.aligner.image_global(self._image_rows(pixels, patches=tokens)).float())
            kept += k
            skipped += bad
            if on_images:
                on_images(len(k) + len(bad))
        dim = out[0].shape[1] if out else 0
        return (torch.cat(out) if out else torch.zeros(0, dim, device=self.device)), kept, skipped

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> Tensor:
        """[M, E] aligned, L2-normalised text embeddings."""
        texts = check_texts(texts)
        tokens = self.aligner.needs_tokens
        out = []
        for b0 in range(0, len(texts), self.batch_size):
            rows = self.text_features(texts[b0 : b0 + self.batch_size])
            if not tokens:
                rows = TextRows(pooled=rows.pooled)
            out.append(self.aligner.text_global(rows).float())
        return torch.cat(out)

    @torch.no_grad()
    def similarity(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str]) -> Tensor:
        """[N, M] cosine similarity of images and texts in the aligned space."""
        return self.encode_image(images) @ self.encode_text(texts).T

    # -- zero-shot --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def classifier(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
        """[C, E] class weights as the eval builds them from a prompt store: every template filled with every label,
        each embedding normalised, mean per label, renormalised (`evaluate.metrics.zero_shot_classifier`)."""
        labels, templates = check_labels(labels), check_templates(templates)
        key = (tuple(labels), tuple(templates))
        if key not in self._classifiers:  # segmenting many images with one label set encodes the prompts once
            texts = [t.replace("{}", label) for label in labels for t in templates]
            item = torch.arange(len(labels)).repeat_interleave(len(templates))
            if len(self._classifiers) >= CLASSIFIERS_KEPT:
                self._classifiers.pop(next(iter(self._classifiers)))
            self._classifiers[key] = zero_shot_classifier(self.encode_text(texts), item.to(self.device), len(labels))
        return self._classifiers[key]

    @torch.no_grad()
    def classify(
        self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> Tensor:
        """[N, C] cosine scores of each image against each label (argmax = the prediction)."""
        return self.encode_image(images) @ self.classifier(labels, templates).T

    @torch.no_grad()
    def segment(
        self,
        image: ImageInput,
        labels: Sequence[str],
        background: str | None = DEFAULT_BACKGROUND,
        templates: Sequence[str] | None = None,
        threshold: float | None = None,
        bias: float | None = None,
    ) -> Segmentation:
        """Per-pixel labels at the image's size, decoded as `pipe eval segmentation` does: the image squashed to the
        encoder's size (the patch grid covers all of it), patch scores `image_dense(patches) @ classifier.T`,
        bilinear upsampling, argmax. `background` is a prompt that competes like a class (None: none). Optional
        rules (evaluate/background.py) turn more pixels into background: `threshold`, where the best other score
        is below it; `bias`, where it is below the background's score + bias."""
        names, bg = segment_names(labels, background)
        threshold = check_rule_value("threshold", threshold)
        bias = check_rule_value("bias", bias, minimum=0.0)
        if (threshold is not None or bias is not None) and background is None:
            raise PipeError("a background threshold or bias needs a background label")
        items = as_list(image)
        if len(items) != 1:
            raise PipeError(f"segment takes one image, got {len(items)}")
        pil = as_pil(items[0])
        pixels = self.image_encoder.preprocess([pil], resize="squash")
        rows = self._image_rows(pixels)
        scores = patch_scores(self.aligner, rows.patches, self.classifier(names, templates), self.image_encoder.grid)
        size = (pil.height, pil.width)
        scores = scores[0]
        return Segmentation(decode(scores, size, bg, threshold, bias), names, scores, bg, threshold, bias)

    @torch.no_grad()
    def anchor_maps(self, image: ImageInput, top: int = 3) -> AnchorMaps:
        """Anchor methods (PAL): the `top` anchors of largest profile value and their cosine maps on the patch grid
        (the image squashed, as for segmentation); another method is a PipeError."""
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
            raise PipeError(f"anchor_maps: top must be an integer >= 1 (anchors to show), got {top!r}")
        anchors, _ = anchors_of(self.aligner)
        rows = self.image_features(image, resize="squash")
        if rows.cls.shape[0] != 1:
            raise PipeError(f"anchor_maps takes one image, got {rows.cls.shape[0]}")
        profile = self.aligner.image_global(rows)[0]
        dense = self.aligner.image_dense(rows.patches)[0]  # [P, K]
        values, idx = torch.topk(profile, min(top, anchors.shape[0]))
        h, w = self.image_encoder.grid
        return AnchorMaps(idx.tolist(), values.tolist(), dense[:, idx].T.reshape(-1, h, w))


# -- inputs ---------------------------------------------------------------------------------------------------------
def like_store(x: Tensor, dtype: str) -> Tensor:
    """Rounded to the feature store's precision and back to float32: what the method saw in training and eval."""
    return x.to(torch.bfloat16 if dtype == "bfloat16" else torch.float16).float()


def as_list(images: ImageInput | Sequence[ImageInput]) -> list:
    """One image or a sequence of them; a [B, 3, H, W] tensor is B images."""
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, Tensor) and images.ndim != 4:
        return [images]
    items = list(images)
    if not items:
        raise PipeError(
            "no images given"
            + (f" (a batch tensor of shape {tuple(images.shape)})" if isinstance(images, Tensor) else "")
        )
    return items


def as_pil(image: ImageInput) -> Image.Image:
    """RGB PIL image from a path (decoded fully: a truncated file fails here), a PIL image, or a [3, H, W] / [H, W]
    tensor (uint8 0-255, or float 0-1 as torchvision's to_tensor gives). Bad input raises UnreadableImage."""
    if isinstance(image, (str, Path)):
        out = open_rgb(Path(image))
    elif isinstance(image, Image.Image):
        out = image.convert("RGB")
    elif isinstance(image, Tensor):
        out = Image.fromarray(tensor_pixels(image)).convert("RGB")
    else:
        raise UnreadableImage(f"not an image: {type(image).__name__} (give a path, a PIL image or a tensor)")
    if out.width < 1 or out.height < 1:
        raise UnreadableImage(f"image of size {out.width}x{out.height}: an image needs at least one pixel")
    return out


def tensor_pixels(image: Tensor) -> np.ndarray:
    """[H, W] or [H, W, 3] uint8 from an image tensor. Only values that are pixels pass: a cast to uint8 would wrap
    300 to 44 and read a bool mask as black and near-black, so both are refused rather than guessed at."""
    x = image.detach().cpu()
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x.permute(1, 2, 0)
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3)):
        raise UnreadableImage(f"image tensor of shape {tuple(image.shape)}: expected [3, H, W] or [H, W]")
    if x.numel() == 0:
        raise UnreadableImage(f"image tensor of shape {tuple(image.shape)}: an image needs at least one pixel")
    if x.dtype == torch.bool or x.is_complex():
        raise UnreadableImage(f"{x.dtype} image tensor: give uint8 0-255 or float 0-1 pixels (a mask is not an image)")
    if x.is_floating_point():
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise UnreadableImage("float image tensor: values must lie in [0, 1]")
        x = (x * 255).round()
    elif x.dtype != torch.uint8 and (x.min() < 0 or x.max() > 255):
        raise UnreadableImage(
            f"{x.dtype} image tensor: values must lie in 0..255, got {x.min().item()}..{x.max().item()}"
        )
    arr = x.to(torch.uint8).numpy()
    return np.ascontiguousarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Texts with something to read: one of only invisible characters (zero-width, controls) tokenizes to nothing
    but the special tokens and would score every image alike; `pipe extract` refuses it as a caption (`is_blank`)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise PipeError("no texts given")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or is_blank(t):
            raise PipeError(f"text {i} is empty: {t!r} has no visible character")
    return texts


def check_label(label: object, what: str = "labels") -> str:
    """One label, stripped: it must have a visible character and no line break or control character (it becomes a
    line of labels.txt and a legend entry)."""
    text = str(label).strip()
    if is_blank(text):
        raise PipeError(f"{what}: label {label!r} has no visible character")
    bad = [ch for ch in text if unicodedata.category(ch) in ("Cc", "Zl", "Zp")]
    if bad:
        raise PipeError(f"{what}: label {text!r} contains a line break or control character ({bad[0]!r})")
    return text


def check_labels(labels: Sequence[str], what: str = "labels") -> list[str]:
    labels = [check_label(x, what) for x in ([labels] if isinstance(labels, str) else labels)]
    if not labels:
        raise PipeError(f"{what}: give at least one non-empty label (e.g. 'cat,dog,grass')")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise PipeError(f"{what}: {', '.join(dup)} given twice")
    return labels


def segment_names(
    labels: Sequence[str], background: str | None = DEFAULT_BACKGROUND, what: str = "labels"
) -> tuple[list[str], int | None]:
    """(names, index of the background): the labels with the background prompt in front unless listed."""
    names = check_labels(labels, what)
    if background is None:
        return names, None
    background = check_label(background, "background")
    if background not in names:
        names = [background, *names]
    return names, names.index(background)


def check_rule_value(what: str, value: float | None, minimum: float | None = None) -> float | None:
    """A background rule's value: a finite number (NaN compares false everywhere and would silently switch the rule
    off; infinity makes every pixel background) and, for the bias, >= 0: a negative margin never changes a pixel."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PipeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise PipeError(f"{what} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise PipeError(
            f"{what} must be >= {minimum:g} (a negative margin never makes a pixel background), got {value}"
        )
    return float(value)


def check_templates(templates: Sequence[str] | None) -> list[str]:
    """The CLIP templates every labelled dataset uses unless given; each needs a '{}' for the label."""
    templates = (
        list(CLIP_TEMPLATES) if templates is None else [templates] if isinstance(templates, str) else list(templates)
    )
    if not templates or any("{}" not in t for t in templates):
        raise PipeError(f"templates: every template needs a '{{}}' for the label, got {templates}")
    return templates
