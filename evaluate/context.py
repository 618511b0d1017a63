"""Opening what one evaluation reads: the run dir (run.json, the fitted aligner) and its feature stores, checked
against the run's encoders and against each other (the run's weights must fit the stores' dimensions). Every user
mistake is a one-line PipeError, a missing store one with the exact `pipe extract` line that would write it."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipe_align.align.base import Aligner
from pipe_align.align.methods import load_aligner
from pipe_align.extract.datasets import dataset_class
from pipe_align.extract.datasets.prompt_sets import has_pal_prompts, prompt_store_suffix
from pipe_align.extract.errors import PipeError
from pipe_align.extract.remote import Remote, location
from pipe_align.extract.store import FeatureStore, open_store, read_json_attrs, recorded_encoder, store_path

from .config import EvalConfig
from .loading import image_rows, text_rows

# Encoder attributes that must agree between the stores a run was trained on and the stores it is evaluated on.
# image_size and max_length may differ (the same encoder at another input size or padding is still the same space).
ENCODER_KEYS = (
    "model_id",
    "revision",
    "weights",
    "dim",
    "layer",
    "patch_size",
    "num_register_tokens",
    "pooling",
    "compute_dtype",
    "crop",
    "special_tokens",
)
TEXT_KINDS = ("prompts", "captions")
# Protocols that score with a named prompt set (extract/datasets/prompt_sets.py) where the dataset has one; no
# fallback to other prompts there: a missing store is an error naming the `pipe extract` line that writes it.
PROTOCOL_PROMPTS = {"pal": "pal"}


@dataclass
class EvalContext:
    """The resolved inputs of one evaluation: run metadata, the fitted aligner and the opened stores."""

    cfg: EvalConfig
    meta: dict[str, Any]  # run.json
    aligner: Aligner
    image: FeatureStore
    text: FeatureStore | None = None
    info: dict[str, Any] = field(default_factory=dict)  # resolved facts for the result's "config"
    notes: list[str] = field(default_factory=list)  # what a person should know about the inputs (stderr)

    @property
    def method(self) -> str:
        return str(self.meta.get("method", self.aligner.name))


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
    except UnicodeDecodeError:
        raise PipeError(f"{path}: not a text file") from None
    if not isinstance(meta, dict):
        raise PipeError(f"{path}: not a run description (a JSON object), got {type(meta).__name__}")
    missing = [k for k in ("method", "image_encoder", "text_encoder") if not meta.get(k)]
    if missing:
        raise PipeError(f"{path}: missing {', '.join(missing)}")
    wrong = [k for k in ("method", "image_encoder", "text_encoder") if not isinstance(meta[k], str)]
    if wrong:
        raise PipeError(f"{path}: {wrong[0]} must be a string, got {meta[wrong[0]]!r}")
    if meta.get("complete") is False:
        raise PipeError(
            f"{path}: the run is not finished (complete: false; `pipe align` was interrupted): finish it "
            "with the same `pipe align` command and --resume"
        )
    return meta


def extract_command(cfg: EvalConfig, encoder: str, text: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """The exact `pipe extract` line that would produce a missing store (`extra`: flags the task needs, such as
    segmentation's `--resize squash`)."""
    parts = [
        "pipe",
        "extract",
        "--encoder",
        encoder,
        "--dataset",
        cfg.dataset,
        "--split",
        cfg.split,
        "--features",
        cfg.features,
    ]
    if cfg.root:
        parts += ["--root", cfg.root]
    if text:
        parts += ["--text", text]
    parts += list(extra)
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
    trained = recorded_encoder(_trained_encoder(meta, modality), modality)
    enc = recorded_encoder(enc, modality)
    diff = [k for k in ENCODER_KEYS if trained.get(k) is not None and enc.get(k) is not None and trained[k] != enc[k]]
    if diff:
        k = diff[0]
        raise PipeError(
            f"{store.path}: encoder {k}={enc[k]!r} but run {run} was trained on {k}={trained[k]!r}; "
            f"re-extract {store.layout.dataset}/{store.layout.split} with the run's encoder"
        )


def store_dataset(cfg: EvalConfig) -> str:
    """The dataset folder of the stores: the name given, or, for a reader whose stores go under another name (`coco`
    writes coco2014/ or coco2017/), the one of those that exists for the split. Old stores under the name given are
    still found when none of those exists; both existing is ambiguous and an error."""
    try:
        names = dataset_class(cfg.dataset).store_names
    except PipeError:
        return cfg.dataset
    found = [n for n in names if (location(cfg.features) / n / cfg.split).is_dir()]
    if len(found) > 1:
        raise PipeError(
            f"--dataset {cfg.dataset}: stores of {' and '.join(found)} exist for split {cfg.split} in "
            f"{cfg.features}; say which with --dataset {found[0]} or --dataset {found[1]}"
        )
    return found[0] if found else cfg.dataset


def prompt_set_for(cfg: EvalConfig, image: FeatureStore) -> str:
    """The prompt set a task scores with: the protocol's (pal) where the PAL authors wrote prompts for the
    dataset's classes, else the standard one (their protocol on a dataset they never evaluated, e.g. the world)."""
    name = PROTOCOL_PROMPTS.get(cfg.protocol or "")
    return name if name and has_pal_prompts(image.layout.dataset, image.layout.classes) else "standard"


def _open(path: Path | Remote, command: str, modality: str, what: str) -> FeatureStore:
    if not (path / "zarr.json").exists():
        raise PipeError(f"no {what} store at {path}; create it with: {command}")
    return open_store(path, modality=modality)


def open_image_store(cfg: EvalConfig, meta: dict[str, Any], extra: tuple[str, ...] = ()) -> FeatureStore:
    alias = meta["image_encoder"]
    path = store_path(cfg.features, store_dataset(cfg), cfg.split, alias)
    st = _open(path, extract_command(cfg, alias, None, extra), "image", "image")
    check_encoder(st, meta, "image", cfg.run)
    if st.layout.count == 0:
        raise PipeError(f"{st.path}: the split {cfg.dataset}/{cfg.split} is empty")
    return st


def open_text_store(cfg: EvalConfig, meta: dict[str, Any], kind: str, image: FeatureStore) -> FeatureStore:
    """kind "prompts" (the class-prompt store, `.prompts.zarr`) or "captions". Class prompts of a dataset whose
    images have no classes (captions only, such as COCO) cannot be extracted: that is the error, not a hint."""
    if kind not in TEXT_KINDS:
        raise ValueError(f"text store kind {kind!r} is not one of {TEXT_KINDS}")
    alias = meta["text_encoder"]
    path = store_path(cfg.features, store_dataset(cfg), cfg.split, alias)
    prompts = prompt_set_for(cfg, image) if kind == "prompts" else "standard"
    if kind == "prompts":
        path = path.with_name(path.name.replace(".zarr", f"{prompt_store_suffix(prompts)}.zarr"))
        if not (path / "zarr.json").exists() and not image.layout.classes:
            raise PipeError(
                f"{cfg.dataset}/{cfg.split} has no classes ({image.path} records none: its images come "
                f"with captions only, no labels or masks); `pipe eval {cfg.task}` needs a dataset with "
                "classes (and masks, for segmentation), such as voc, ade20k or world"
            )
    what = "caption" if kind == "captions" else "class-prompt" if prompts == "standard" else f"{prompts} class-prompt"
    extra = ("--prompts", prompts) if prompts != "standard" else ()
    st = _open(path, extract_command(cfg, alias, kind, extra), "text", what)
    check_encoder(st, meta, "text", cfg.run)
    if kind == "prompts" and not st.layout.classes:
        raise PipeError(f"{st.path}: holds no class prompts (no 'classes' attribute)")
    if kind == "prompts" and (st.layout.prompts or "standard") != prompts:
        raise PipeError(
            f"{st.path}: holds the {st.layout.prompts or 'standard'} prompt set, not {prompts}; "
            f"re-extract it: {extract_command(cfg, alias, kind, extra)}"
        )
    if kind == "captions" and st.layout.templates is not None:
        raise PipeError(f"{st.path}: holds class prompts, not captions")
    if st.layout.count == 0:
        raise PipeError(f"{st.path}: the split {cfg.dataset}/{cfg.split} has no {kind}")
    return st


def check_fit(aligner: Aligner, run: str, image: FeatureStore, text: FeatureStore | None, device: str) -> None:
    """The run's weights must fit the stores: one row of each store is embedded (a shape error is a PipeError
    naming the weights file and the stores' dimensions), and image and text embeddings must share a dimension."""
    weights = Path(run) / aligner.weights_file
    dims = f"{image.path} has dim {image.layout.dim}" + (f", {text.path} dim {text.layout.dim}" if text else "")
    tokens = aligner.needs_tokens
    try:
        img = aligner.image_global(image_rows(image, 0, 1, tokens, device))
        dense = aligner.image_dense(image.rows("patches", 0, 1).float().to(device)) if image.layout.grid else None
        txt = aligner.text_global(text_rows(text, 0, 1, tokens, device)) if text else None
    except (RuntimeError, ValueError, IndexError) as e:
        raise PipeError(f"{weights}: does not fit the stores ({dims}): {str(e).splitlines()[0]}") from None
    widths = {"image": img.shape[-1]} | ({"dense": dense.shape[-1]} if dense is not None else {})
    widths |= {"text": txt.shape[-1]} if txt is not None else {}
    if len(set(widths.values())) > 1:
        sizes = ", ".join(f"{k} {v}" for k, v in widths.items())
        raise PipeError(f"{weights}: its embeddings differ in size ({sizes}); the weights are not one run's")


def load_context(cfg: EvalConfig, text: str | None, extract_options: tuple[str, ...] = ()) -> EvalContext:
    """Run metadata, aligner and stores for one task: the image store, and the text store of kind `text` ("prompts",
    "captions" or None); `extract_options` go into the `pipe extract` hint for a missing image store."""
    if not location(cfg.features).is_dir():
        raise PipeError(f"--features {cfg.features}: no such folder")
    meta = read_run(cfg.run)
    image = open_image_store(cfg, meta, extract_options)
    txt = open_text_store(cfg, meta, text, image) if text else None
    aligner = load_aligner(cfg.run, device=cfg.device)
    if aligner.name != meta["method"]:
        raise PipeError(
            f"{Path(cfg.run) / 'run.json'} names method {meta['method']!r} but method.json "
            f"{aligner.name!r}: a run dir mixed from two runs"
        )
    check_fit(aligner, cfg.run, image, txt, cfg.device)
    notes = [
        f"{st.path} has no checksums (written before crc32c/1): damage to it cannot be detected; re-extract it"
        for st in (image, txt)
        if st is not None and st.layout.checksums is None
    ]
    info = {
        "method": meta.get("method"),
        "image_store": str(image.path),
        "text_store": str(txt.path) if txt else None,
        "image_encoder": meta["image_encoder"],
        "text_encoder": meta["text_encoder"],
        "layer": image.layout.encoder.get("layer"),
        "image_size": image.layout.encoder.get("image_size"),
        "grid": list(image.layout.grid) if image.layout.grid else None,
        "resize": image.layout.resize,
        "tokens": meta.get("tokens"),
    }
    if txt is not None and text == "prompts":
        info["prompts"] = txt.layout.prompts or "standard"
        if cfg.protocol in PROTOCOL_PROMPTS and info["prompts"] != PROTOCOL_PROMPTS[cfg.protocol]:
            notes.append(
                f"--protocol {cfg.protocol}: the PAL authors wrote no prompts for {cfg.dataset} "
                f"({image.layout.dataset}); scored with its standard prompts"
            )
    return EvalContext(cfg, meta, aligner, image, txt, info, notes)
