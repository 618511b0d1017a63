"""`pipe reproduce RECIPE --dry-run`: the plan of a recipe run, per stage, without doing any of it: the stores it will
extract (rows, shapes, raw size, whether one is already complete), the runs it will train (resolved settings, pairs,
held-out pairs, the memory the training tokens take) and the evaluations, with the disk and the encoder compute that
the extraction needs. Reads the datasets' annotation files and the encoders' config files only (no weights, no
images), so it runs in seconds on the machine that will do the work.

Compute is counted, not timed: 2 x parameters x tokens per forward (parameters from the config's shapes, an estimate
within a few percent for ViT and BERT-style encoders); divide by the rate your device achieves (`--tflops`, e.g.
from `python bench/extract.py --device cuda`) for a time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipe_align.align.methods import get_method
from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.datasets.prompt_sets import prompt_set, prompt_store_suffix
from pipe_align.extract.encoders.base import load_pretrained
from pipe_align.extract.encoders.registry import resolve_source
from pipe_align.extract.errors import PipeError
from pipe_align.extract.job import ExtractConfig
from pipe_align.extract.store import read_json_attrs, store_path

from .recipe import check_datasets
from .reproduce import ReproduceConfig, eval_config, extract_configs, run_dir, selection


@dataclass(frozen=True)
class EncoderShape:
    """What the plan needs of an encoder, from its config.json."""

    modality: str
    dim: int
    params: int  # estimated from the shapes: 12 d^2 per block + embeddings
    patch: int | None
    image_size: int | None
    prefix: int  # CLS + register tokens ahead of the patches


@dataclass(frozen=True)
class StorePlan:
    path: Path
    kind: str  # image, captions, prompts
    rows: int
    tokens: int  # stored per row (patches, or padded text positions)
    dim: int
    raw_bytes: int  # float16: the token array plus the global vector
    gflop: float  # encoder forwards for every row
    state: str  # complete, incomplete (resumed), absent


def encoder_shape(name: str, image_size: int | None = None) -> EncoderShape:
    """dim, estimated parameters and input layout of an encoder from its config (weights are not read)."""
    from transformers import AutoConfig

    source = resolve_source(name)
    cfg = load_pretrained(AutoConfig, source, "config")
    cfg = getattr(cfg, "vision_config", None) or cfg
    d, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    inner = int(getattr(cfg, "intermediate_size", 0) or d * float(getattr(cfg, "mlp_ratio", 4)))
    block = 4 * d * d + 2 * d * inner
    if hasattr(cfg, "patch_size"):
        patch = int(cfg.patch_size)
        size = int(image_size or _crop_size(source) or cfg.image_size)
        registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        embed = 3 * patch * patch * d
        return EncoderShape("image", d, layers * block + embed, patch, size, 1 + registers)
    embed = int(getattr(cfg, "vocab_size", 0)) * d
    return EncoderShape("text", d, layers * block + embed, None, None, 0)


def _crop_size(source: Any) -> int | None:
    """The processor's crop size, which the encoder uses as its input size unless --image-size says otherwise."""
    folder = Path(source.model_id)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    crop = json.loads(path.read_text()).get("crop_size")
    return int(crop.get("height") if isinstance(crop, dict) else crop) if crop else None


def store_plan(cfg: ExtractConfig, shape: EncoderShape) -> StorePlan:
    """Rows, shape, size and compute of one store, and whether it is already there."""
    ds = get_dataset(cfg.dataset, cfg.root, cfg.split, **dict(cfg.options))
    name = ds.store_name or cfg.dataset
    path = store_path(cfg.features, name, cfg.split, cfg.encoder)
    images = ds.images()
    n_img = len(images) if cfg.limit is None else min(cfg.limit, len(images))
    if shape.modality == "image":
        grid = (shape.image_size // shape.patch) ** 2
        rows, tokens, kind = n_img, grid, "image"
        seq = grid + shape.prefix
    else:
        mode = cfg.text if cfg.text != "auto" else ("captions" if ds.captions() is not None else "prompts")
        if mode == "captions":
            rows, kind = sum(1 for c in ds.captions() or [] if c.item < n_img), "captions"
        else:
            templates = tuple(cfg.templates) if cfg.templates else tuple(ds.templates())
            ps = prompt_set(cfg.prompts, ds.name, tuple(ds.classes or ()), templates)
            rows, kind = len(ps.names) * len(ps.templates), "prompts"
            path = path.with_name(path.name.replace(".zarr", f"{prompt_store_suffix(cfg.prompts)}.zarr"))
        tokens = seq = cfg.max_length if cfg.max_length != "longest" else longest_text(cfg, ds, kind, n_img)
    state = "absent"
    if (path / "zarr.json").is_file():
        state = "complete" if read_json_attrs(path).get("complete") else "incomplete (resumed)"
    raw = rows * (tokens + 1) * shape.dim * 2
    return StorePlan(path, kind, rows, tokens, shape.dim, raw, rows * 2.0 * shape.params * seq / 1e9, state)


def longest_text(cfg: ExtractConfig, ds: Any, kind: str, n_img: int) -> int:
    """The stored length under `max_length = "longest"`: the longest text as the tokenizer cuts it (only the
    tokenizer is loaded)."""
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer, resolve_source(cfg.encoder), "tokenizer")
    if kind == "captions":
        texts = [c.text for c in ds.captions() or [] if c.item < n_img]
    else:
        templates = tuple(cfg.templates) if cfg.templates else tuple(ds.templates())
        ps = prompt_set(cfg.prompts, ds.name, tuple(ds.classes or ()), templates)
        texts = [t.replace("{}", c) for c in ps.names for t in ps.templates]
    specials = 0 if cfg.special_tokens == "keep" else tok.num_special_tokens_to_add(pair=False)
    return max([1, *(len(ids) - specials for ids in tok(texts)["input_ids"])])


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def dry_run(cfg: ReproduceConfig, tflops: float | None = None) -> str:
    """The plan as text (what `pipe reproduce --dry-run` prints); writes nothing."""
    r = cfg.recipe
    excluded = selection(r, cfg.only, cfg.skip)
    evals = [e for e in r.evals if e.dataset not in excluded]
    methods = [m for m in r.methods if m.name not in excluded]
    check_datasets(r, list(dict.fromkeys([r.train.dataset, *(e.dataset for e in evals)])))
    enc = r.encoders
    shapes = {enc.image: encoder_shape(enc.image), enc.text: encoder_shape(enc.text)}
    stores = [store_plan(ec, shapes[ec.encoder]) for ec in extract_configs(cfg, evals)]
    lines = [f"plan of recipe {r.name} ({r.path}); nothing is run (--dry-run)"]
    if excluded:
        lines.append("left out: " + ", ".join(f"{n} ({why})" for n, why in excluded.items()))
    lines.append(
        f"encoders: image {enc.image} (layer {enc.layer}, crop {enc.crop}, {shapes[enc.image].dim}-d, "
        f"~{shapes[enc.image].params / 1e6:.1f}M parameters), text {enc.text} (layer {enc.layer}, special "
        f"tokens {enc.special_tokens}, max_length {enc.max_length}, {shapes[enc.text].dim}-d, "
        f"~{shapes[enc.text].params / 1e6:.1f}M parameters)"
    )
    todo = [s for s in stores if s.state != "complete"]
    lines.append(f"[1/4] extract: {len(stores)} stores under {cfg.feature_dir} ({len(stores) - len(todo)} complete)")
    for s in stores:
        lines.append(
            f"      {s.path.relative_to(cfg.feature_dir)}: {s.kind}, {s.rows:,} rows x {s.tokens} tokens x "
            f"{s.dim}, {_size(s.raw_bytes)} raw, {s.gflop / 1e3:,.1f} TFLOP ({s.state})"
        )
    disk = sum(s.raw_bytes for s in todo)
    compute = sum(s.gflop for s in todo) / 1e3
    when = (
        f" = {compute / tflops / 3600:.2f} h at {tflops:g} TFLOP/s achieved"
        if tflops
        else " (give --tflops, your device's achieved rate, for a time)"
    )
    lines.append(f"      to do: {_size(disk)} raw float16 (zstd removes the text padding), {compute:,.1f} TFLOP{when}")
    train = next(s for s in stores if s.kind == "image")
    caps = next(s for s in stores if s.kind == "captions")
    held = (
        f", early stopping on {r.train.dataset}/{r.train.val_split}"
        if r.train.val_split
        else f", {r.train.run.val_fraction:g} of them held out"
    )
    lines.append(
        f"[2/4] align: {len(methods)} methods on {r.train.dataset}/{r.train.split} ({train.rows:,} images, "
        f"{caps.rows:,} captions{held})"
    )
    for m in methods:
        method = get_method(m.method)
        run = m.run.resolved(method)
        hidden = ("device", "memory_budget", "val_shards")
        settings = {k: v for k, v in dataclasses.asdict(run).items() if k not in hidden and v is not None}
        params = ", ".join(f"{k}={v}" for k, v in m.params) or "defaults"
        tokens = method.wants_tokens(method.Config(**dict(m.params)))
        per_caption = caps.tokens + 1 if tokens else 1
        per_image = train.tokens + 2 if tokens else 1  # patches + CLS (+ the global vector)
        served = train.rows if run.captions == "first" else caps.rows
        need = (train.rows * per_image * train.dim + served * per_caption * caps.dim) * 2
        lines.append(
            f"      {m.name} ({m.method}: {params}): {_fmt(settings)}; training data {_size(need)} "
            f"({'tokens' if tokens else 'global vectors'}; streamed from the stores above the memory "
            f"budget) -> {run_dir(cfg, m)}"
        )
    lines.append(f"[3/4] eval: {len(evals)} evaluations x {len(methods)} methods")
    for ev in evals:
        path = Path(eval_config(cfg, ev, Path("RUN"), "cpu").features)
        lines.append(f"      {ev.label}: metrics {', '.join(r.metrics(ev))} (stores under {path})")
    lines.append(f"[4/4] table: {Path(cfg.out) / 'table.md'}, {Path(cfg.out) / 'table.json'}")
    return "\n".join(lines)


def _fmt(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items())


def check_tflops(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise PipeError(f"--tflops must be a positive rate (TFLOP/s your device achieves), got {value}")
    return value
