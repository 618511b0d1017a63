"""A paper recipe: one TOML file naming the encoders, the datasets and their roots, the training set, the evaluations,
the methods and the paper's published numbers (docs/reproduce.md). `load_recipe` parses it into frozen dataclasses;
every unknown key or bad value is a one-line PipeError naming the file, the key and what is allowed.

Relative roots resolve against `--data DIR` when given, otherwise against the recipe file's folder; a shipped recipe
(looked up by name) has no folder of its own, so it needs `--data` or `--root NAME=PATH` for every root it uses.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pipe_align.align.loop import RunConfig
from pipe_align.align.methods import get_method, method_names
from pipe_align.evaluate.tasks import get_task
from pipe_align.extract.datasets import DATASETS
from pipe_align.extract.encoders.base import CROPS, SPECIAL_TOKENS
from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import NAME_RULE, check_name
from pipe_align.extract.job import ExtractConfig, check_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TASKS = ("classification", "retrieval", "segmentation")  # the tasks whose stores reproduce knows how to extract
# Metrics shown per task unless an eval lists its own; a metric a paper number names is shown too.
DEFAULT_METRICS = {
    "classification": ("acc1", "balanced_acc"),
    "retrieval": ("text_retrieval_recall@1", "image_retrieval_recall@1"),
    "segmentation": ("mIoU", "fg_mIoU"),
}
METRICS = {
    "classification": ("acc1", "acc5", "balanced_acc"),
    "retrieval": tuple(f"{d}_retrieval_recall@{k}" for d in ("text", "image") for k in (1, 5, 10)),
    "segmentation": ("mIoU", "fg_mIoU", "mAcc", "aAcc", "bg_ignored/mIoU"),
}
# device: a command-line option; val_shards: a folder, which a recipe names as [train] val_split (reproduce finds it)
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("device", "val_shards"))
# ExtractConfig fields a dataset entry may set (`extract = { templates = [...] }`); the others come from the recipe's
# encoders, the dataset entry itself and the command line.
EXTRACT_KEYS = tuple(
    f.name
    for f in dataclasses.fields(ExtractConfig)
    if f.name
    not in (
        "encoder",
        "dataset",
        "split",
        "features",
        "root",
        "options",
        "text",
        "batch_size",
        "device",
        "layer",
        "max_length",
        "threads",
        "crop",
        "special_tokens",
    )
)


@dataclass(frozen=True)
class Encoders:
    image: str
    text: str
    layer: str = "last"  # the hidden state stored for both encoders (docs/encoders.md)
    max_length: int | str = 64  # or "longest": each store's longest text, no truncation below the model's limit
    crop: str = "processor"  # how images are cropped (extract/encoders/base.py CROPS)
    special_tokens: str = "keep"  # which caption positions are tokens (SPECIAL_TOKENS)


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # the recipe's key: what --root, --only and --skip name
    reader: str  # the dataset reader (pipe_align.extract.datasets)
    root: str | None  # absolute (relative only in a shipped recipe without --data), None for datasets that need none
    options: tuple[tuple[str, Any], ...] = ()
    extract: tuple[tuple[str, Any], ...] = ()  # ExtractConfig settings for this dataset's stores (EXTRACT_KEYS)


@dataclass(frozen=True)
class TrainSpec:
    dataset: str
    split: str
    run: RunConfig
    val_split: str | None = None  # held-out pairs: this split of the training dataset (its own stores), not a fraction
    preset: str | None = None  # `pipe align --preset` of every method that has presets (PAL: auto, paper, small)


@dataclass(frozen=True)
class EvalSpec:
    task: str
    dataset: str
    split: str
    protocol: str | None = None
    metrics: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.task} {self.dataset}/{self.split}" + (f" [{self.protocol}]" if self.protocol else "")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the run dir's name and the table's row
    method: str  # the registered alignment method
    params: tuple[tuple[str, Any], ...]
    run: RunConfig
    preset: str | None = None  # [train] preset, for a method that has presets


@dataclass(frozen=True)
class PaperNumber:
    method: str
    task: str
    dataset: str
    metric: str
    value: float  # percent, as printed in the paper


@dataclass(frozen=True)
class Recipe:
    path: str
    name: str
    title: str
    source: str
    encoders: Encoders
    datasets: tuple[DatasetSpec, ...]
    train: TrainSpec
    evals: tuple[EvalSpec, ...]
    methods: tuple[MethodSpec, ...]
    paper: tuple[PaperNumber, ...]

    def dataset(self, name: str) -> DatasetSpec:
        return next(d for d in self.datasets if d.name == name)

    def published(self, method: str, task: str, dataset: str, metric: str) -> float | None:
        return next(
            (p.value for p in self.paper if (p.method, p.task, p.dataset, p.metric) == (method, task, dataset, metric)),
            None,
        )

    def metrics(self, ev: EvalSpec) -> tuple[str, ...]:
        """The eval's metrics (its own list, else the task's defaults) plus any the paper names for it."""
        shown = list(ev.metrics or DEFAULT_METRICS[ev.task])
        for p in self.paper:
            if (p.task, p.dataset) == (ev.task, ev.dataset) and p.metric not in shown:
                shown.append(p.metric)
        return tuple(shown)


def shipped_recipes() -> dict[str, Path]:
    """Recipes installed with the package (pipelines/recipes/*.toml), by name."""
    folder = resources.files("pipe_align.pipelines") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def find_recipe(arg: str) -> tuple[Path, bool]:
    """(path, shipped): a file path, or the name of a shipped recipe (`pal-paper`)."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path, False
    shipped = shipped_recipes()
    if arg in shipped:
        return shipped[arg], True
    raise PipeError(
        f"recipe {arg!r}: no such file and no shipped recipe of that name (shipped: "
        f"{', '.join(sorted(shipped)) or 'none'})"
    )


def check_datasets(recipe: Recipe, used: Sequence[str]) -> None:
    """The datasets a run uses need an installed reader and a resolved root. Checked when the recipe runs, not when
    it is read, so a recipe may name readers of a newer pipe, or roots nobody gave, and leave those out (--skip)."""
    for name in used:
        ds = recipe.dataset(name)
        if ds.reader not in DATASETS:
            raise PipeError(
                f"{recipe.path}: datasets.{name}.reader: no dataset reader {ds.reader!r} in this pipe "
                f"(leave it out with --skip {name}); allowed: {', '.join(DATASETS.names())}"
            )
        if ds.root is not None and not Path(ds.root).is_absolute():
            raise PipeError(
                f"{recipe.path}: datasets.{name}.root: {ds.root!r} is relative and "
                f"{Path(recipe.path).name} is a shipped recipe; allowed: --data DIR (the folder holding "
                f"the datasets) or --root {name}=PATH"
            )


def parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (2, 0.5, true, [1, 2], "x"), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_recipe(
    arg: str, data: str | Path | None = None, roots: Sequence[str] = (), sets: Sequence[str] = ()
) -> Recipe:
    """Parse a recipe file (or shipped name). `sets`: KEY.PATH=VALUE overrides of any recipe key, applied before
    validation; `roots`: NAME=PATH overrides of dataset roots, relative to the current directory."""
    path, shipped = find_recipe(arg)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise PipeError(f"{path}: not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipeError(f"{path}: cannot be read ({e})") from None
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipeError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {item!r}")
        _assign(raw, key.strip().split("."), parse_value(value), f"--set {item}")
    for item in roots:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise PipeError(f"--root expects NAME=PATH (e.g. coco=/data/coco), got {item!r}")
        ds = raw.get("datasets")
        if not isinstance(ds, dict) or name not in ds:
            names = ", ".join(sorted(ds)) if isinstance(ds, dict) else "none"
            raise PipeError(f"--root {item}: {path.name} has no dataset {name!r} (its datasets: {names})")
        if isinstance(ds[name], str):  # the short form NAME = "ROOT"
            ds[name] = {"root": ds[name]}
        _assign(raw, ["datasets", name, "root"], str(Path(value).expanduser().resolve()), f"--root {item}")
    base = Path(data).expanduser().resolve() if data is not None else None if shipped else path.parent.resolve()
    return _Parser(path).recipe(raw, base)


def _assign(raw: dict, keys: list[str], value: Any, where: str) -> None:
    """raw[k0][k1]... = value; a number picks an entry of an array of tables (eval.0.split=val)."""
    node: Any = raw
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise PipeError(f"{where}: {'.'.join(keys[:depth])} has entries 0-{len(node) - 1}, not {k!r}")
            k = int(k)
        elif not isinstance(node, dict):
            raise PipeError(f"{where}: {'.'.join(keys[:depth])} is not a table")
        elif not last:
            node.setdefault(k, {})
        if last:
            node[k] = value
        else:
            node = node[k]


class _Parser:
    """Validation with one message shape: '<file>: <key>: <problem>; allowed: <choices>'."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str, allowed: Sequence[str] | str | None = None) -> PipeError:
        tail = "" if allowed is None else f"; allowed: {allowed if isinstance(allowed, str) else ', '.join(allowed)}"
        return PipeError(f"{self.path}: {key}: {problem}{tail}")

    def table(self, raw: Any, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
        if not isinstance(raw, dict):
            raise self.fail(key, f"must be a table, got {type(raw).__name__}")
        for k in raw:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else k, "unknown key", allowed)
        for k in required:
            if k not in raw:
                raise self.fail(f"{key}.{k}" if key else k, "missing (required)")
        return raw

    def string(self, raw: dict, key: str, where: str, default: str | None = None) -> str | None:
        value = raw.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.fail(f"{where}.{key}", f"must be a non-empty string, got {value!r}")
        return value

    def name(self, value: Any, key: str) -> str:
        """A string that becomes one path component (a run folder, a store folder, the output folder's name)."""
        try:
            return check_name(value, key)
        except PipeError:
            raise self.fail(key, f"{value!r} is not a name (one path component)", NAME_RULE) from None

    def choice(self, value: str, key: str, allowed: Sequence[str]) -> str:
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not one of them", allowed)
        return value

    def recipe(self, raw: dict, base: Path | None) -> Recipe:
        top = self.table(
            raw,
            "",
            ("recipe", "encoders", "datasets", "train", "eval", "methods", "paper"),
            ("encoders", "datasets", "train", "eval", "methods"),
        )
        meta = self.table(top.get("recipe", {}), "recipe", ("name", "title", "source"))
        encoders = self.encoders(top["encoders"])
        datasets = self.datasets(top["datasets"], base)
        names = [d.name for d in datasets]
        train = self.train(top["train"], names)
        evals = self.evals(top["eval"], names)
        methods = self.methods(top["methods"], train.run, train.preset)
        paper = self.paper(top.get("paper", {}), methods, evals)
        name = self.name(meta["name"], "recipe.name") if "name" in meta else self.path.stem
        return Recipe(
            str(self.path),
            name,
            self.string(meta, "title", "recipe") or name,
            self.string(meta, "source", "recipe") or "",
            encoders,
            datasets,
            train,
            evals,
            methods,
            paper,
        )

    def encoders(self, raw: Any) -> Encoders:
        t = self.table(
            raw, "encoders", ("image", "text", "layer", "max_length", "crop", "special_tokens"), ("image", "text")
        )
        layer = t.get("layer", "last")
        if isinstance(layer, int) and not isinstance(layer, bool):
            layer = str(layer)
        if not isinstance(layer, str) or not (layer == "last" or layer.lstrip("-").isdigit()):
            raise self.fail("encoders.layer", f"{layer!r} is not a layer", "'last' or a hidden-state index")
        length = t.get("max_length", 64)
        if length != "longest" and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise self.fail("encoders.max_length", f'{length!r} is not a positive integer or "longest"')
        crop = self.choice(self.string(t, "crop", "encoders", "processor"), "encoders.crop", CROPS)
        specials = self.choice(
            self.string(t, "special_tokens", "encoders", "keep"), "encoders.special_tokens", SPECIAL_TOKENS
        )
        return Encoders(
            self.string(t, "image", "encoders"), self.string(t, "text", "encoders"), layer, length, crop, specials
        )

    def datasets(self, raw: Any, base: Path | None) -> tuple[DatasetSpec, ...]:
        if not isinstance(raw, dict) or not raw:
            raise self.fail("datasets", "must be a table of named datasets ([datasets.NAME])")
        out = []
        for name, entry in raw.items():
            key = f"datasets.{self.name(name, f'datasets.{name!r}')}"
            t = self.table(
                {"root": entry} if isinstance(entry, str) else entry, key, ("reader", "root", "options", "extract")
            )
            reader = self.name(t.get("reader", name), f"{key}.reader")  # checked when used: check_datasets
            options = t.get("options", {})
            if not isinstance(options, dict):
                raise self.fail(f"{key}.options", f"must be a table of reader options, got {options!r}")
            root = self.string(t, "root", key)
            if root is not None:  # a relative root without a base stays relative: check_datasets refuses it if used
                root = Path(root).expanduser()
                root = str(base / root if base is not None and not root.is_absolute() else root)
            extract = self.table(t.get("extract", {}), f"{key}.extract", EXTRACT_KEYS)
            extract = {k: tuple(v) if isinstance(v, list) else v for k, v in extract.items()}
            try:
                check_config(ExtractConfig(encoder="x", dataset=reader, split="x", features="x", **extract))
            except PipeError as e:
                raise self.fail(f"{key}.extract", str(e)) from None
            out.append(DatasetSpec(name, reader, root, tuple(sorted(options.items())), tuple(sorted(extract.items()))))
        return tuple(out)

    def run_config(self, raw: dict, key: str, base: RunConfig | None = None) -> RunConfig:
        given = {k: v for k, v in raw.items() if k in RUN_KEYS}
        try:
            return dataclasses.replace(base, **given) if base is not None else RunConfig(**given)
        except PipeError as e:  # RunConfig names the flag ("--batch-size VALUE ..."): name the recipe key instead
            flag, _, problem = str(e).partition(" ")
            raise self.fail(f"{key}.{flag.removeprefix('--').replace('-', '_')}", problem) from None
        except TypeError as e:
            raise self.fail(key, str(e)) from None

    def train(self, raw: Any, names: list[str]) -> TrainSpec:
        t = self.table(raw, "train", ("dataset", "split", "val_split", "preset", "recipe", *RUN_KEYS), ("dataset",))
        dataset = self.choice(self.string(t, "dataset", "train"), "train.dataset", names)
        split = self.name(t.get("split", "train"), "train.split")
        val_split = t.get("val_split")
        if val_split is not None:
            val_split = self.name(val_split, "train.val_split")
        if val_split is not None and val_split == split:
            raise self.fail("train.val_split", f"{val_split!r} is the training split itself; name another split")
        run = self.run_config(t, "train")
        if val_split is not None and run.val_fraction > 0:
            raise self.fail(
                "train.val_fraction",
                f"{run.val_fraction} would hold out training pairs beside val_split {val_split!r}; set it to 0",
            )
        if "preset" in t and "recipe" in t:
            raise self.fail("train.recipe", "is the old name of train.preset; give one")
        preset = self.string(t, "preset" if "preset" in t else "recipe", "train")
        return TrainSpec(dataset, split, run, val_split, preset)

    def evals(self, raw: Any, names: list[str]) -> tuple[EvalSpec, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail("eval", "must be an array of tables ([[eval]] entries)")
        out = []
        for i, entry in enumerate(raw):
            key = f"eval[{i}]"
            required = ("task", "dataset", "split")
            t = self.table(entry, key, (*required, "protocol", "metrics"), required)
            task = self.choice(self.string(t, "task", key), f"{key}.task", TASKS)
            protocol = self.string(t, "protocol", key)
            protocols = tuple(get_task(task).protocols)
            if protocol is not None and not protocols:
                raise self.fail(f"{key}.protocol", f"task {task} takes no protocol")
            if protocol is not None:
                self.choice(protocol, f"{key}.protocol", protocols)
            elif protocols:
                protocol = protocols[0]
            metrics = t.get("metrics", [])
            if not isinstance(metrics, list):
                raise self.fail(f"{key}.metrics", f"must be a list, got {metrics!r}", METRICS[task])
            for m in metrics:
                self.choice(m, f"{key}.metrics", METRICS[task])
            ev = EvalSpec(
                task,
                self.choice(self.string(t, "dataset", key), f"{key}.dataset", names),
                self.name(t["split"], f"{key}.split"),
                protocol,
                tuple(metrics),
            )
            if any((e.task, e.dataset) == (ev.task, ev.dataset) for e in out):
                raise self.fail(
                    key,
                    f"a second {task} eval of dataset {ev.dataset} (the table keys cells by task and "
                    "dataset: add a second [datasets] entry for another split)",
                )
            out.append(ev)
        return tuple(out)

    def methods(self, raw: Any, train_run: RunConfig, preset: str | None = None) -> tuple[MethodSpec, ...]:
        """[methods.NAME] entries; `preset` ([train] preset) goes to each method that has presets, and must be one of
        each such method's presets (a preset no method of the recipe has is refused)."""
        if not isinstance(raw, dict) or not raw:
            raise self.fail("methods", "must be a table of named methods ([methods.NAME])")
        out = []
        for name, entry in raw.items():
            key = f"methods.{self.name(name, f'methods.{name!r}')}"
            if not isinstance(entry, dict):
                raise self.fail(key, f"must be a table, got {entry!r}")
            method = self.choice(self.string(entry, "method", key, default=name), f"{key}.method", method_names())
            fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
            t = self.table(entry, key, ("method", "run", *sorted(fields)))
            params = {k: v for k, v in t.items() if k in fields}
            try:
                get_method(method).Config(**params)
            except (TypeError, ValueError, PipeError) as e:
                raise self.fail(key, f"bad option value for method {method} ({e})") from None
            run = t.get("run", {})
            self.table(run, f"{key}.run", RUN_KEYS)
            own = preset if get_method(method).presets else None
            if own is not None:
                try:
                    get_method(method).check_preset(own)
                except PipeError as e:
                    raise self.fail("train.preset", str(e).removeprefix(f"--preset {own!r}: ")) from None
            out.append(
                MethodSpec(
                    name, method, tuple(sorted(params.items())), self.run_config(run, f"{key}.run", train_run), own
                )
            )
        if preset is not None and all(m.preset is None for m in out):
            raise self.fail("train.preset", f"{preset!r}: no method of this recipe has presets")
        return tuple(out)

    def paper(self, raw: Any, methods: tuple[MethodSpec, ...], evals: tuple[EvalSpec, ...]) -> tuple[PaperNumber, ...]:
        """[paper.METHOD.TASK.DATASET] METRIC = value (percent), for methods and evals the recipe has."""
        out = []
        t = self.table(raw, "paper", [m.name for m in methods])
        for method, tasks in t.items():
            tasks = self.table(tasks, f"paper.{method}", sorted({e.task for e in evals}))
            for task, sets in tasks.items():
                sets = self.table(sets, f"paper.{method}.{task}", [e.dataset for e in evals if e.task == task])
                for dataset, metrics in sets.items():
                    key = f"paper.{method}.{task}.{dataset}"
                    for metric, value in self.table(metrics, key, METRICS[task]).items():
                        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                            raise self.fail(f'{key}."{metric}"', f"{value!r} is not a percentage (0-100)")
                        out.append(PaperNumber(method, task, dataset, metric, float(value)))
        return tuple(out)
