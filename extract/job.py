"""What an extraction computes: the resolved config, and the plan (dataset rows, encoder, store layout) that every
executor, local or dask, turns into the same shards. Planning writes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from .datasets import DATASETS, get_dataset
from .datasets.base import is_blank
from .datasets.prompt_sets import PROMPT_SETS, prompt_set, prompt_store_suffix
from .encoders.base import (
    COMPUTE_DTYPES,
    CROPS,
    SPECIAL_TOKENS,
    Options,
    Source,
    check_choice,
    check_image_size,
    resolve_compute_dtype,
)
from .encoders.registry import build_encoder, resolve_source
from .errors import PipeError
from .files import check_name
from .runtime import resolve_device
from .store import DTYPES, StoreLayout, default_rows, store_path

TEXT_MODES = ("auto", "captions", "prompts", "phrases")
PHRASE_SUFFIX = ".phrases"  # <encoder>.phrases.zarr: the marked phrases of a caption set, each as its own text


@dataclass(frozen=True)
class ExtractConfig:
    """One `pipe extract` invocation, resolved; persisted in the store attributes as `extract`."""

    encoder: str
    dataset: str
    split: str
    features: str
    root: str | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float16"  # stored features
    compute_dtype: str = "auto"  # the forward: bfloat16 on a CUDA device that has it, else float32 (store records it)
    limit: int | None = None
    image_size: int | None = None
    layer: str = "last"
    max_length: int | str = 64  # text positions stored per row, or "longest": the longest text's, no truncation
    text: str = "auto"  # "captions", "prompts" (class templates), "phrases" or "auto" (captions when the set has them)
    templates: tuple[str, ...] | None = None  # override the dataset's prompt templates
    resize: str = "auto"  # image encoders: "crop", "squash", or "auto" (squash when the set has masks)
    strict: bool = False  # a corrupt image fails the run instead of being skipped
    shard_rows: int | None = None
    options: tuple[tuple[str, Any], ...] = ()  # dataset options (e.g. world size, seed)
    threads: int | None = None  # torch threads per process (dask workers)
    prompts: str = "standard"  # class-prompt set, "standard" or "pal" (datasets/prompt_sets.py); image stores ignore it
    crop: str = "processor"  # image stores: the model's processor or "short-side" (encoders/base.py CROPS)
    special_tokens: str = "keep"  # text stores: every attention-mask position, or "drop" the specials (SPECIAL_TOKENS)


def cached_encoder(
    name: str,
    layer: str,
    image_size: int | None,
    max_length: int,
    device: str,
    compute_dtype: str = "float32",
    crop: str = "processor",
    special_tokens: str = "keep",
):
    """One loaded encoder per process, weights identity and settings: every plan with the same encoder (image and
    text stores of a split, a resumed run, a test re-checking a store) reuses it, and new weights saved into the
    same folder are loaded anew (the source carries the folder's content hash)."""
    dtype = COMPUTE_DTYPES[resolve_compute_dtype(compute_dtype, device)]
    return _loaded(
        resolve_source(name),
        Options(
            layer=layer,
            image_size=image_size,
            max_length=max_length,
            device=device,
            dtype=dtype,
            crop=crop,
            special_tokens=special_tokens,
        ),
    )


@lru_cache(maxsize=4)
def _loaded(source: Source, options: Options):
    return build_encoder(source, options)


@dataclass
class Job:
    """What a shard needs: the config, the dataset, the encoder, the rows to produce and the store."""

    cfg: ExtractConfig
    dataset: Any
    encoder: Any
    layout: StoreLayout
    path: str
    image_rows: list | None = None  # ImageRecord per row (image stores)
    text_rows: list[tuple[str, str, int]] | None = None  # (id, text, item) per row (text stores)
    text_mode: str | None = None  # text stores: "captions", "prompts" or "phrases"
    captions: list | None = None  # caption stores: the dataset's Caption per row (their phrase markup)


def _text_mode(cfg: ExtractConfig, dataset) -> str:
    if cfg.text not in TEXT_MODES:
        raise PipeError(f"--text must be {', '.join(TEXT_MODES)}, got {cfg.text!r}")
    if cfg.text != "auto":
        return cfg.text
    return "captions" if dataset.captions() is not None else "prompts"


def check_config(cfg: ExtractConfig) -> None:
    """Option values that cannot work, refused before a dataset is read or an encoder loaded (one line each)."""
    check_name(cfg.split, "--split")  # a folder of the store's path: never one outside --features
    check_max_length(cfg.max_length)
    for flag, value in (
        ("--batch-size", cfg.batch_size),
        ("--limit", cfg.limit),
        ("--shard-rows", cfg.shard_rows),
        ("--threads", cfg.threads),
    ):
        if value is not None and value < 1:
            raise PipeError(f"{flag} must be >= 1, got {value}")
    if cfg.image_size is not None:
        check_image_size(cfg.image_size)
    if cfg.dtype not in DTYPES:
        raise PipeError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    resolve_compute_dtype(cfg.compute_dtype, "cpu")  # the name only; "auto" is resolved for the device in `plan`
    check_choice(cfg.crop, CROPS, "--crop")
    check_choice(cfg.special_tokens, SPECIAL_TOKENS, "--special-tokens")
    if cfg.resize not in ("auto", "crop", "squash"):
        raise PipeError(f"--resize must be auto, crop or squash, got {cfg.resize!r}")
    if cfg.text not in TEXT_MODES:
        raise PipeError(f"--text must be {', '.join(TEXT_MODES)}, got {cfg.text!r}")
    if cfg.prompts not in PROMPT_SETS:
        raise PipeError(f"--prompts must be one of {', '.join(PROMPT_SETS)}, got {cfg.prompts!r}")
    if cfg.prompts != "standard" and cfg.templates:
        raise PipeError(f"--prompts {cfg.prompts} brings its own templates; --templates applies to the standard set")
    if cfg.prompts != "standard" and cfg.text == "captions":
        raise PipeError(f"--prompts {cfg.prompts} names class prompts; it does not apply to --text captions")


def check_max_length(value: int | str) -> int | str:
    """A positive number of text positions, or "longest" (the longest text of the store, up to the model's limit)."""
    if value == "longest":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PipeError(f"--max-length must be a positive integer or 'longest', got {value!r}")
    return value


def _no_classes(cfg: ExtractConfig, dataset) -> PipeError:
    """--text prompts of a dataset without classes: say which datasets have them (what classification and
    segmentation need)."""
    labelled = ", ".join(sorted(n for n, c in DATASETS.items() if c.labelled))
    what = f"{cfg.dataset} captions have" if dataset.captions() is not None else f"dataset {cfg.dataset} has"
    masks = "masks or classes" if not dataset.has_masks() else "classes"
    return PipeError(
        f"--text prompts: {what} no {masks}; segmentation and classification need a dataset with classes "
        f"({labelled}); use --text captions for this one"
    )


def plan(cfg: ExtractConfig) -> Job:
    """Resolve dataset, encoder, rows and the store layout (no writing)."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    dataset = get_dataset(cfg.dataset, cfg.root, cfg.split, **dict(cfg.options))
    longest = cfg.max_length == "longest"  # the loaded encoder is fitted to the store's texts below
    enc = cached_encoder(
        cfg.encoder,
        cfg.layer,
        cfg.image_size,
        1 if longest else cfg.max_length,
        device,
        cfg.compute_dtype,
        cfg.crop,
        cfg.special_tokens,
    )
    info = asdict(enc.info)
    images = dataset.images()
    limit = len(images) if cfg.limit is None else min(cfg.limit, len(images))
    classes = tuple(dataset.classes) if dataset.classes is not None else None
    if info["modality"] == "image":
        pixels = dataset.has_masks() or dataset.has_boxes()  # masks and boxes must keep their pixel alignment
        resize = cfg.resize if cfg.resize != "auto" else ("squash" if pixels else "crop")
        rows = images[:limit]
        if not rows:
            raise PipeError(f"dataset {cfg.dataset} split {cfg.split!r} has no images under {cfg.root}")
        grid = tuple(enc.grid)
        tokens, extra = grid[0] * grid[1], {"grid": grid, "resize": resize, "classes": classes}
        text_rows = None
    else:
        mode = _text_mode(cfg, dataset)
        caps_kept = None
        if mode == "phrases":
            text_rows, extra = _phrase_rows(cfg, dataset, limit), {}
        elif mode == "captions":
            if cfg.prompts != "standard":
                raise PipeError(
                    f"--prompts {cfg.prompts} names class prompts, but {cfg.dataset} gives captions; add --text prompts"
                )
            caps = dataset.captions()
            if caps is None:
                raise PipeError(f"dataset {cfg.dataset} has no captions; use --text prompts")
            caps_kept = [c for c in caps if c.item < limit]
            text_rows = [(c.id, c.text, c.item) for c in caps_kept]
            extra = {}
        else:
            if classes is None:
                raise _no_classes(cfg, dataset)
            templates = tuple(cfg.templates) if cfg.templates else tuple(dataset.templates())
            if not templates or any("{}" not in t for t in templates):
                raise PipeError(f"--templates: every template needs a '{{}}' for the class name, got {templates}")
            ps = prompt_set(cfg.prompts, dataset.name, classes, templates)
            text_rows = [
                (f"{ci}:{ti}", t.replace("{}", c), ci)
                for ci, c in enumerate(ps.names)
                for ti, t in enumerate(ps.templates)
            ]
            extra = {"classes": classes, "templates": ps.templates}
            if ps.name != "standard":  # standard stores keep the attributes they always had
                extra |= {"prompts": ps.name, "prompt_names": ps.names}
        for rid, text, _ in text_rows:
            if is_blank(text):
                raise PipeError(
                    f"dataset {cfg.dataset} split {cfg.split}: caption {rid} is empty ({text!r} has no "
                    "visible character)"
                )
        if not text_rows:
            raise PipeError(f"dataset {cfg.dataset} split {cfg.split!r} has no captions")
        if longest:
            enc = enc.fitted_to([text for _, text, _ in text_rows])
            info = asdict(enc.info)
        tokens, rows = enc.info.max_length, None
    count = len(rows) if rows is not None else len(text_rows)
    per_chunk, per_shard = default_rows(tokens, info["dim"], count, cfg.shard_rows)
    origin = {"root": None if cfg.root is None else str(cfg.root), "options": dict(cfg.options), "limit": cfg.limit}
    name = dataset.store_name or cfg.dataset  # `coco` -> coco2017: a store path tells the two years apart
    layout = StoreLayout(
        modality=info["modality"],
        encoder=info,
        dataset=name,
        split=cfg.split,
        count=count,
        tokens=tokens,
        dim=info["dim"],
        rows_per_chunk=per_chunk,
        rows_per_shard=per_shard,
        dtype=cfg.dtype,
        origin=origin,
        **extra,
    )
    suffix = prompt_store_suffix(cfg.prompts) if info["modality"] == "text" and "templates" in extra else ""
    path = store_path(cfg.features, name, cfg.split, cfg.encoder)
    if info["modality"] == "text" and mode == "phrases":
        suffix = PHRASE_SUFFIX
    path = path.with_name(path.name.replace(".zarr", f"{suffix}.zarr"))
    text = info["modality"] == "text"
    return Job(
        cfg,
        dataset,
        enc,
        layout,
        str(path),
        image_rows=rows,
        text_rows=text_rows,
        text_mode=mode if text else None,
        captions=caps_kept if text else None,
    )


def _phrase_rows(cfg: ExtractConfig, dataset, limit: int) -> list[tuple[str, str, int]]:
    """Every marked phrase as its own text (what a method without token-level text grounds): id
    f"{caption id}/{k}" for the caption's k-th phrase, item = its image."""
    caps = dataset.captions() if dataset.has_boxes() else None
    if not caps:
        raise PipeError(f"--text phrases: dataset {cfg.dataset} has no phrase markup (flickr30k-entities and world do)")
    return [
        (f"{c.id}/{k}", c.text[p.start : p.stop], c.item)
        for c in caps
        if c.item < limit
        for k, p in enumerate(c.phrases)
    ]
