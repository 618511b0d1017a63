"""What every eval task shares: the frozen config, the run dir, finding and checking the stores, blocked reading.

Evaluations never hold a whole token store in memory: rows are read in blocks of whole chunks that tile a shard
(at most a few hundred MB of float32 per block), embedded, and only the small per-row outputs ([N, E] embeddings,
logits, confusion matrices) are kept.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipe_align.align.base import Aligner, ImageRows, TextRows
from pipe_align.align.methods import load_aligner
from pipe_align.evaluate.metrics import zero_shot_classifier
from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import FeatureStore, open_store, read_json_attrs, store_path

TASKS = ("classification", "retrieval", "segmentation", "diagnostics")
PROTOCOLS = ("pal", "standard")
BLOCK_BYTES = 128 << 20  # float32 bytes of token rows per read block (a shard or an exact fraction of one)
# Encoder attributes that must agree between the stores a run was trained on and the stores it is evaluated on.
# image_size and max_length may differ (the same encoder at another input size or padding is still the same space).
ENCODER_KEYS = ("model_id", "revision", "weights", "dim", "layer", "patch_size", "num_register_tokens", "pooling")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation, as the CLI resolved it; written into the result JSON under "config"."""

    task: str
    dataset: str
    split: str
    features: str
    run: str
    root: str | None = None
    protocol: str | None = None  # segmentation only: "pal" or "standard"
    options: tuple[tuple[str, Any], ...] = ()  # dataset options (-o KEY=VALUE)
    device: str = "cpu"
    figures: bool = True
    examples: int = 4  # images shown in each figure
    seed: int = 0  # the random mismatched captions of the diagnostics

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d


@dataclass
class EvalContext:
    """The resolved inputs of one evaluation: run metadata, the fitted aligner and the opened stores."""

    cfg: EvalConfig
    meta: dict[str, Any]  # run.json
    aligner: Aligner
    image: FeatureStore
    text: FeatureStore | None = None
    info: dict[str, Any] = field(default_factory=dict)  # resolved facts for the result's "config"

    @property
    def method(self) -> str:
        return str(self.meta.get("method", self.aligner.name))


# -- the run dir ------------------------------------------------------------------------------------------------------


def result_path(cfg: EvalConfig) -> Path:
    """RUN/eval/{task}-{dataset}-{split}[-{protocol}].json (clip_benchmark-style name from a template)."""
    parts = [cfg.task, cfg.dataset, cfg.split] + ([cfg.protocol] if cfg.protocol else [])
    name = "-".join(p.replace("/", "_").replace("\\", "_") for p in parts)
    return Path(cfg.run) / "eval" / f"{name}.json"


def figure_path(cfg: EvalConfig, what: str) -> Path:
    return result_path(cfg).parent / "figures" / f"{result_path(cfg).stem}-{what}.png"


def read_run(run: str | Path) -> dict[str, Any]:
    """run.json of a run dir; the encoders it names decide which stores are evaluated."""
    path = Path(run) / "run.json"
    if not Path(run).is_dir():
        raise PipeError(f"--run {run}: no such folder")
    if not path.is_file():
        raise PipeError(f"--run {run}: no run.json (train a run with `pipe align`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipeError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in ("method", "image_encoder", "text_encoder") if not meta.get(k)]
    if missing:
        raise PipeError(f"{path}: missing {', '.join(missing)}")
    return meta


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)  # a half-written JSON would be taken for a finished eval by --skip-existing


# -- stores -----------------------------------------------------------------------------------------------------------


def extract_command(cfg: EvalConfig, encoder: str, text: str | None = None) -> str:
    """The exact `pipe extract` line that would produce a missing store."""
    parts = ["pipe", "extract", "--encoder", encoder, "--dataset", cfg.dataset, "--split", cfg.split,
             "--features", cfg.features]  # fmt: skip
    if cfg.root:
        parts += ["--root", cfg.root]
    if text:
        parts += ["--text", text]
    if cfg.task == "segmentation":
        parts += ["--resize", "squash"]
    for key, value in cfg.options:
        parts += ["-o", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return " ".join(shlex.quote(p) for p in parts)


def _run_encoder_info(meta: dict[str, Any], modality: str) -> dict[str, Any] | None:
    """The encoder attributes of the store the run was trained on, when run.json records them (a dict with an
    "encoder" entry, or a path to that store)."""
    for key in (f"{modality}_store", f"{modality}_encoder_info"):
        value = meta.get(key)
        if isinstance(value, dict) and isinstance(value.get("encoder"), dict):
            return value["encoder"]
        if isinstance(value, dict) and {"model_id", "dim"} & set(value):
            return value
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        if path and (Path(path) / "zarr.json").is_file():
            enc = read_json_attrs(path).get("encoder")
            if isinstance(enc, dict):
                return enc
    encoders = meta.get("encoders")
    if isinstance(encoders, dict) and isinstance(encoders.get(modality), dict):
        return encoders[modality]
    return None


def _trained_encoder(meta: dict[str, Any], modality: str) -> dict[str, Any]:
    """What run.json says about the run's encoder: the training store's attributes, then top-level `<m>_layer` and
    `<m>_weights` (as `pipe align` writes them)."""
    out = dict(_run_encoder_info(meta, modality) or {})
    for key in ("layer", "weights"):
        if meta.get(f"{modality}_{key}") is not None:
            out.setdefault(key, meta[f"{modality}_{key}"])
    return out


def check_encoder(store: FeatureStore, meta: dict[str, Any], modality: str, run: str) -> None:
    """The store must hold features of the encoder the run was trained on (alias, and details where recorded)."""
    alias = meta[f"{modality}_encoder"]
    enc = store.layout.encoder
    if enc.get("alias") != alias:
        raise PipeError(f"{store.path}: written by encoder {enc.get('alias')!r} but run {run} uses {alias!r}")
    trained = _trained_encoder(meta, modality)
    diff = [k for k in ENCODER_KEYS if trained.get(k) is not None and enc.get(k) is not None and trained[k] != enc[k]]
    if diff:
        k = diff[0]
        raise PipeError(f"{store.path}: encoder {k}={enc[k]!r} but run {run} was trained on {k}={trained[k]!r}; "
                        f"re-extract {store.layout.dataset}/{store.layout.split} with the run's encoder")


def _open(path: Path, cfg: EvalConfig, encoder: str, text: str | None, what: str) -> FeatureStore:
    if not (path / "zarr.json").exists():
        raise PipeError(f"no {what} store at {path}; create it with: {extract_command(cfg, encoder, text)}")
    return open_store(path, modality="text" if text else "image")


def open_image_store(cfg: EvalConfig, meta: dict[str, Any]) -> FeatureStore:
    alias = meta["image_encoder"]
    st = _open(store_path(cfg.features, cfg.dataset, cfg.split, alias), cfg, alias, None, "image")
    check_encoder(st, meta, "image", cfg.run)
    if st.layout.count == 0:
        raise PipeError(f"{st.path}: the split {cfg.dataset}/{cfg.split} is empty")
    return st


def open_text_store(cfg: EvalConfig, meta: dict[str, Any], kind: str) -> FeatureStore:
    """kind "prompts" (the class-prompt store, `.prompts.zarr`) or "captions"."""
    alias = meta["text_encoder"]
    path = store_path(cfg.features, cfg.dataset, cfg.split, alias)
    if kind == "prompts":
        path = path.with_name(path.name.replace(".zarr", ".prompts.zarr"))
    st = _open(path, cfg, alias, kind, "class-prompt" if kind == "prompts" else "caption")
    check_encoder(st, meta, "text", cfg.run)
    if kind == "prompts" and not st.layout.classes:
        raise PipeError(f"{st.path}: holds no class prompts (no 'classes' attribute)")
    if kind == "captions" and st.layout.templates is not None:
        raise PipeError(f"{st.path}: holds class prompts, not captions")
    if st.layout.count == 0:
        raise PipeError(f"{st.path}: the split {cfg.dataset}/{cfg.split} has no {kind}")
    return st


def load_context(cfg: EvalConfig, text: str | None) -> EvalContext:
    """Run metadata, aligner and stores for one task; every user mistake is a one-line PipeError."""
    if cfg.task not in TASKS:
        raise PipeError(f"unknown task {cfg.task!r} (choose from: {', '.join(TASKS)})")
    if cfg.protocol is not None and cfg.protocol not in PROTOCOLS:
        raise PipeError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    if not Path(cfg.features).is_dir():
        raise PipeError(f"--features {cfg.features}: no such folder")
    meta = read_run(cfg.run)
    image = open_image_store(cfg, meta)
    txt = open_text_store(cfg, meta, text) if text else None
    aligner = load_aligner(cfg.run, device=cfg.device)
    info = {
        "method": meta.get("method"), "image_store": str(image.path), "text_store": str(txt.path) if txt else None,
        "image_encoder": meta["image_encoder"], "text_encoder": meta["text_encoder"],
        "layer": image.layout.encoder.get("layer"), "image_size": image.layout.encoder.get("image_size"),
        "grid": list(image.layout.grid) if image.layout.grid else None, "resize": image.layout.resize,
        "tokens": meta.get("tokens"),
    }  # fmt: skip
    return EvalContext(cfg, meta, aligner, image, txt, info)


# -- reading in blocks ------------------------------------------------------------------------------------------------


def row_blocks(store: FeatureStore, tokens: bool = True, budget: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges: whole chunks, an exact divisor of a shard, under `budget` float32 bytes."""
    lay = store.layout
    row_bytes = (lay.tokens if tokens else 1) * lay.dim * 4
    rows = lay.rows_per_shard
    if lay.rows_per_shard % lay.rows_per_chunk == 0:  # always so for stores written by pipe extract
        chunks = lay.rows_per_shard // lay.rows_per_chunk
        fits = [d for d in range(1, chunks + 1) if chunks % d == 0 and d * lay.rows_per_chunk * row_bytes <= budget]
        rows = max(fits or [1]) * lay.rows_per_chunk
    for start in range(0, lay.count, rows):
        yield start, min(start + rows, lay.count)


def image_rows(store: FeatureStore, start: int, stop: int, patches: bool, device: str) -> ImageRows:
    """Rows as float32 on the device (stores hold float16 or bfloat16)."""
    cls = store.rows("cls", start, stop).float().to(device)
    pt = store.rows("patches", start, stop).float().to(device) if patches else None
    return ImageRows(cls=cls, patches=pt)


def text_rows(store: FeatureStore, start: int, stop: int, tokens: bool, device: str) -> TextRows:
    rows = TextRows(pooled=store.rows("pooled", start, stop).float().to(device))
    if tokens:
        rows.tokens = store.rows("tokens", start, stop).float().to(device)
        rows.length = torch.from_numpy(store["length"][start:stop].astype(np.int64)).to(device)
    return rows


@torch.no_grad()
def embed_images(aligner: Aligner, store: FeatureStore, device: str) -> Tensor:
    """image_global of every row [N, E] on the CPU (skipped rows included; callers drop them)."""
    out = []
    for start, stop in row_blocks(store, tokens=aligner.needs_tokens):
        out.append(aligner.image_global(image_rows(store, start, stop, aligner.needs_tokens, device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(aligner: Aligner, store: FeatureStore, device: str) -> Tensor:
    """text_global of every row [M, E] on the CPU."""
    out = []
    for start, stop in row_blocks(store, tokens=aligner.needs_tokens):
        out.append(aligner.text_global(text_rows(store, start, stop, aligner.needs_tokens, device)).float().cpu())
    return torch.cat(out)


def is_background(classes: list[str] | tuple[str, ...]) -> bool:
    """VOC-style sets (VOC, the world) put a "background" class at index 0."""
    return bool(classes) and classes[0].strip().lower() == "background"


def is_zero_ignored(dataset: str, classes: list[str] | tuple[str, ...]) -> bool:
    """ADE20K-style sets: label 0 ("other") is unlabelled and ignored (mmseg reduce_zero_label)."""
    return dataset.lower() == "ade20k" or (bool(classes) and classes[0].strip().lower() == "other")


def class_weights(ctx: EvalContext) -> tuple[Tensor, list[str]]:
    """Zero-shot classifier [C, E] (on the CPU) from the class-prompt store: text_global per prompt (PAL: anchor
    pooling of the prompt's word tokens), each normalised, mean per class, renormalised."""
    st = ctx.text
    classes = list(st.layout.classes)
    emb = embed_texts(ctx.aligner, st, ctx.cfg.device)
    item = torch.from_numpy(st["item"][:].astype(np.int64))
    try:
        return zero_shot_classifier(emb, item, len(classes)), classes
    except ValueError as e:
        raise PipeError(f"{st.path}: {e}") from None


def open_dataset(cfg: EvalConfig):
    from pipe_align.extract.datasets import get_dataset

    return get_dataset(cfg.dataset, cfg.root, cfg.split, **dict(cfg.options))


def check_origin(store: FeatureStore, cfg: EvalConfig) -> None:
    """Masks are matched to store rows by id, and some datasets (the world) reuse ids across options: the dataset
    opened for evaluation must be the one the store was extracted from (root and -o options, as recorded)."""
    origin = store.layout.origin
    if origin is None:  # stores written before origins were recorded
        return
    want = {k: str(v) for k, v in (origin.get("options") or {}).items()}
    got = {k: str(v) for k, v in cfg.options}
    root_then, root_now = origin.get("root"), cfg.root
    same_root = (root_then is None and root_now is None) or (
        root_then is not None and root_now is not None and Path(root_then).resolve() == Path(root_now).resolve()
    )
    if want != got or not same_root:
        opts = " ".join(f"-o {k}={v}" for k, v in sorted(want.items())) or "no -o options"
        raise PipeError(f"{store.path}: was extracted from --root {root_then} with {opts}; evaluate with the same")


def dataset_rows(dataset, ids: np.ndarray, where: Path) -> np.ndarray:
    """Dataset index of each store row, matched by id (the store may hold a prefix of the split, or another order)."""
    index = {r.id: i for i, r in enumerate(dataset.images())}
    out = np.empty(len(ids), dtype=np.int64)
    for row, rid in enumerate(ids):
        i = index.get(str(rid))
        if i is None:
            raise PipeError(f"{where}: row {row} has id {rid!r}, which dataset {dataset.name}/{dataset.split} lacks "
                            "(--root or -o options differ from the extraction?)")
        out[row] = i
    return out
