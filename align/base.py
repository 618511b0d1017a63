"""The one interface every alignment method implements, so training and evaluation never special-case a method.

A method is a class registered with `@register_method("name")` in its own file under align/. It maps store rows into a
shared space:

    image_global(ImageRows) -> [N, E]      text_global(TextRows) -> [M, E]      image_dense(patches) -> [N, P, E]

Similarity is always the dot product of L2-normalised outputs (methods return normalised embeddings), and dense
class scores are `image_dense(patches) @ text_global(prompts).T`.

An aligner is a `torch.nn.Module`: its trained tensors are `nn.Parameter`s, its fitted fixed tensors (a rotation,
projections, anchors, means) buffers, so `state_dict`, `load_state_dict`, `.to(device)` and `parameters()` are
torch's. `save(dir)` writes the state dict as `weights.safetensors` (PAL: `anchors.safetensors`) plus `method.json`;
`align.methods.load_aligner(dir)` reads any method back: `blank(config, shapes)` builds the method with the shapes
its config fixes, and `load_state_dict(strict=True)` fills it.

Methods come in two kinds, and `align.loop.fit` is the one way to fit either:
- `ClosedFormAligner`: `fit(data, config, seed)` computes the method from the gathered training pairs (procrustes,
  cca, csa, asif); no loop.
- `TrainedAligner`: supplies its parameters, its loss on a batch and its embed functions; `align.loop` owns
  everything else (held-out split, epochs, schedule, clipping, early stopping, checkpoints and resume, data
  parallelism, progress, metrics). See docs/align.md for a new method in one file.
"""

from __future__ import annotations

import abc
import functools
import json
import math
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_bytes, write_text
from pipe_align.extract.registry import Registry

METHODS: Registry[type[Aligner]] = Registry("method", name_attr="name")


@dataclass
class ImageRows:
    """Rows of an image store as float tensors: global token [N, D] and patch tokens [N, P, D] (may be None when a
    method does not need them)."""

    cls: Tensor
    patches: Tensor | None = None


@dataclass
class TextRows:
    """Rows of a text store: padded word tokens [M, L, D] with valid lengths [M], and the encoder's pooled [M, D]."""

    pooled: Tensor
    tokens: Tensor | None = None
    length: Tensor | None = None

    def mask(self) -> Tensor:
        """[M, L] bool, True on valid word tokens (the stores keep valid tokens first)."""
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps[None, :] < self.length.to(self.tokens.device)[:, None]


@dataclass
class TrainingData:
    """What a method is fitted from: the training pairs and the held-out pairs (`align.data.PairSource`, or anything
    with the same `batches(epoch, batch_size, seed, shuffle=..., part=...)` and `len`), and optional unpaired rows
    (SOTAlign). The held-out rows are the same for every method given the run's seed and val fraction."""

    train: Any
    val: Any | None = None
    unpaired: tuple[ImageRows, TextRows] | None = None


@dataclass(frozen=True)
class Plan:
    """What a run trains with, as a method's preset hook resolved it: the method's options (the user's, filled in by
    the preset; `Config(**params)` is the config), the run config, and what run.json records under "preset" (empty:
    no preset, nothing recorded). `run` is an `align.loop.RunConfig` (the loop sits above this module, so it is not
    named here)."""

    params: dict[str, Any]
    run: Any
    record: dict[str, Any]


INT_LIMIT = 1 << 20  # the largest value of a method's integer option that declares no limit of its own


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _limits(cls: type) -> dict[str, tuple[int | None, int]]:
    """`limits` of the class and its bases merged (a subclass's entry wins)."""
    return {k: v for c in reversed(cls.__mro__) for k, v in vars(c).get("limits", {}).items()}


def value_problem(obj: Any, default_max: int | None = None) -> tuple[str, str] | None:
    """(field, problem) for the first field of a config dataclass whose value is not of its annotated type (int: an
    integer, not a bool; float: a finite number; str; bool: true or false; `X | None` also None) or outside the
    inclusive `limits[field]` = (lowest or None, highest) of the class, else None. Integer fields without a limit are
    bounded by `default_max` when given. Checked before any other range check, so those can compare freely."""
    limits = _limits(type(obj))
    for f in fields(obj):
        v, tp = getattr(obj, f.name), _field_types(type(obj))[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if args and v is None and len(args) < len(typing.get_args(tp)):
            continue
        kind = args[0] if len(args) == 1 else tp
        lo, hi = limits.get(f.name, (None, default_max) if kind is int else (None, None))
        span = f"from {lo} to {hi}" if lo is not None and hi is not None else f"up to {hi}" if hi is not None else ""
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            return f.name, f"is not an integer; allowed: an integer {span}".rstrip()
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            return f.name, "is not a finite number"
        if kind is str and not isinstance(v, str):
            return f.name, "is not a string"
        if kind is bool and not isinstance(v, bool):
            return f.name, "is not true or false"
        if kind in (int, float) and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            return f.name, f"is out of range; allowed: {span}"
    return None


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config: its own hyper-parameters only (run-wide settings such as the seed, epochs
    and batch size live in `align.loop.RunConfig`). Each field becomes a `pipe align` option; its help is the field's
    `metadata["help"]`. Every value must be of its field's type; float fields must be finite (an infinite temperature
    or rate is never meant); integer fields stay within `limits` (default: up to INT_LIMIT), so that no option can ask
    for an allocation or a loop that never ends (docs/guarantees.md, "Security")."""

    limits: ClassVar[dict[str, tuple[int | None, int]]] = {}

    def __post_init__(self) -> None:
        problem = value_problem(self, INT_LIMIT)
        if problem is not None:
            name, what = problem
            raise PipeError(f"{name}={getattr(self, name)!r} {what}")
        self.check()

    def check(self) -> None:
        """Range checks of the subclass (raise PipeError naming the option)."""


@dataclass(frozen=True)
class TrainedConfig(MethodConfig):
    """Optimiser settings every trained method has (AdamW, learning-rate schedule, gradient clipping); each method
    declares its own defaults by redeclaring the fields."""

    lr: float = field(default=1e-3, metadata={"help": "Trained methods: AdamW learning rate (peak)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Trained methods: AdamW weight decay."})
    beta1: float = field(default=0.9, metadata={"help": "Trained methods: AdamW beta1."})
    beta2: float = field(default=0.999, metadata={"help": "Trained methods: AdamW beta2."})
    warmup_epochs: float = field(default=0.0, metadata={"help": "Trained methods: epochs of linear LR warm-up."})
    schedule: str = field(
        default="constant",
        metadata={
            "help": "Trained methods: learning-rate schedule after warm-up: cosine (to zero at the last epoch), "
            "constant, or cosine_cycle (periodic cosine with a half period of --cycle-epochs, as torch's "
            "CosineAnnealingLR stepped per batch)."
        },
    )
    cycle_epochs: float = field(
        default=50.0,
        metadata={
            "help": "Trained methods: schedule cosine_cycle: epochs per half period (torch's CosineAnnealingLR T_max, "
            "counted as epochs x max(1, pairs // batch) steps)."
        },
    )
    grad_clip: float = field(default=0.0, metadata={"help": "Trained methods: gradient norm clip; 0 = off."})
    grad_clip_mode: str = field(
        default="global",
        metadata={
            "help": "Trained methods: clip the norm of all gradients together (global) or of each parameter group on "
            "its own (per_group; PAL: each anchor bank; linear, mlp: each parameter tensor, as the STRUCTURE "
            "code)."
        },
    )
    lr_finder: int = field(
        default=0,
        metadata={
            "help": "Trained methods: iterations of the LR finder run before training (0 = off); its pick replaces "
            "--lr."
        },
    )
    lr_finder_start: float = field(default=1e-7, metadata={"help": "Trained methods: LR finder's first rate."})
    lr_finder_end: float = field(default=10.0, metadata={"help": "Trained methods: LR finder's last rate."})
    lr_finder_draw: str = field(
        default="epochs",
        metadata={
            "help": "Trained methods: the LR finder's batches: subset (each iteration a random full batch of a random "
            "5,000-pair subset of the training pairs, as the PAL authors) or epochs (the loop's own batches of "
            "successive shuffled epochs)."
        },
    )

    limits: ClassVar[dict[str, tuple[int | None, int]]] = {"lr_finder": (0, 10_000)}

    def __post_init__(self) -> None:
        super().__post_init__()  # types first: the comparisons below need numbers
        bad = {
            "lr": self.lr >= 0,
            "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "warmup_epochs": self.warmup_epochs >= 0,
            "grad_clip": self.grad_clip >= 0,
            "schedule": self.schedule in SCHEDULES,
            "cycle_epochs": self.cycle_epochs > 0,
            "grad_clip_mode": self.grad_clip_mode in CLIP_MODES,
            "lr_finder": self.lr_finder >= 0,
            "lr_finder_draw": self.lr_finder_draw in FINDER_DRAWS,
            "lr_finder_start": 0 < self.lr_finder_start < self.lr_finder_end,
        }
        for name, ok in bad.items():
            if not ok:
                raise PipeError(f"{name}={getattr(self, name)!r} is out of range")


SCHEDULES = ("cosine", "constant", "cosine_cycle")
CLIP_MODES = ("global", "per_group")
FINDER_DRAWS = ("epochs", "subset")  # TrainedConfig.lr_finder_draw


class Aligner(nn.Module, abc.ABC):
    """A fitted alignment, as a torch module of its tensors. Subclasses set `Config`, `needs_tokens`, implement the
    abstract methods, and override `blank` where a tensor's shape depends on the data (input dims, a fitted rank)."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_tokens: ClassVar[bool] = False  # whether fit / *_global read token arrays (not just cls / pooled)
    weights_file: ClassVar[str] = "weights.safetensors"

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def wants_tokens(cls, config: MethodConfig) -> bool:
        """Whether this configuration reads token arrays (the data loader asks before fitting)."""
        return cls.needs_tokens

    # -- presets: the method's own automatic choice of settings (`pipe align --preset NAME`) ------------------------
    # A method with presets names them in `presets` (the first is the default) and overrides `preset_plan`, and
    # `preset_search` when a preset picks settings on the training data; its file owns that code, as a model file owns
    # its default settings. `align.run` calls the hooks and records the plan; it never asks which method it runs.
    presets: ClassVar[tuple[str, ...]] = ()
    preset_help: ClassVar[dict[str, str]] = {}  # option -> what a non-default preset sets it to, for --help

    @classmethod
    def check_preset(cls, preset: str | None) -> str | None:
        """The preset a run uses (None: the method has none). A method without presets refuses one (`none` is
        accepted as "no preset"); an unknown name lists the method's presets."""
        if not cls.presets:
            if preset not in (None, "none"):
                raise PipeError(f"--preset {preset}: method {cls.name} has no presets; it uses its own defaults")
            return None
        if preset is None:
            return cls.presets[0]
        if preset not in cls.presets:
            raise PipeError(
                f"--preset {preset!r}: unknown for method {cls.name}; choose one of {', '.join(cls.presets)}"
            )
        return preset

    @classmethod
    def preset_plan(cls, preset: str | None, params: dict[str, Any], run: Any, n_train: int) -> Plan | None:
        """The settings to train with, given the user's options `params` (validated; they win over any preset), the
        run config (`align.loop.RunConfig`) and the number of training pairs; or None when the preset must look at the
        data first (`preset_search`). Default, for a method without presets: its config's defaults and its
        `run_defaults`."""
        return Plan(dict(params), run.resolved(cls), {})

    @classmethod
    def preset_search(
        cls, preset: str, params: dict[str, Any], run: Any, data: TrainingData, dp: Any = None, say: bool = False
    ) -> Plan:
        """The data-dependent part of a preset, called once when `preset_plan` returned None, with the training and
        held-out pairs loaded (`dp`: the `align.ddp.DataParallel` of this process or None; `say`: print progress to
        stderr). Its plan is recorded in run.json before training,
        so a resumed or repeated run reuses it instead of searching again."""
        raise NotImplementedError(f"method {cls.name}: preset {preset!r} needs a search, and the method has none")

    @classmethod
    def blank(cls, config: MethodConfig, shapes: dict[str, tuple[int, ...]]) -> Aligner:
        """An unfitted aligner to load a saved state into (`load_state_dict(strict=True)`): every tensor of the shape
        `config` gives it; a size the config leaves to the data (an input dim, a fitted rank) is read from `shapes`,
        the saved tensors' (`saved_size`), so that a file that disagrees with its config is refused, not adopted.
        Default: the method as `cls(config)` builds it (tensors whose shapes the config alone fixes)."""
        return cls(config)

    @abc.abstractmethod
    def image_global(self, rows: ImageRows) -> Tensor:
        """[N, E] L2-normalised embeddings of whole images."""

    @abc.abstractmethod
    def text_global(self, rows: TextRows) -> Tensor:
        """[M, E] L2-normalised embeddings of captions or prompts."""

    @abc.abstractmethod
    def image_dense(self, patches: Tensor) -> Tensor:
        """[N, P, E] per-patch embeddings (or scores) whose dot product with `text_global` gives class scores."""

    def word_patch_scores(self, patches: Tensor, tokens: Tensor) -> Tensor | None:
        """[N, L, P] similarity of every word token (in its sentence) to every patch, for methods whose text side is
        token-level (PAL); None for the others, which phrase grounding serves by embedding each phrase as its own
        text (`text_global` against `image_dense`)."""
        return None

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        write_bytes(out / self.weights_file, save(state))
        meta = {"method": self.name, "config": asdict(self.config)} | (extra or {})
        write_text(out / "method.json", json.dumps(meta, indent=2))

    @classmethod
    def config_from_dict(cls, config: dict[str, Any]) -> MethodConfig:
        """The method's config from method.json's "config" (fields it does not know are dropped)."""
        names = {f.name for f in fields(cls.Config)}
        return cls.Config(**{k: v for k, v in config.items() if k in names})


def saved_size(shapes: dict[str, tuple[int, ...]], key: str, axis: int) -> int:
    """Size `axis` of the saved tensor `key` (for `Aligner.blank`); a missing tensor or one with too few dims is a
    PipeError (load_aligner adds the file)."""
    if key not in shapes:
        raise PipeError(f"tensor {key!r} is missing")
    if len(shapes[key]) <= axis:
        raise PipeError(f"tensor {key!r} has shape {list(shapes[key])}, too few dims")
    return int(shapes[key][axis])


def state_mismatch(expected: dict[str, Tensor], saved: dict[str, Tensor]) -> str | None:
    """What keeps `saved` from loading strictly into a module whose state dict is `expected` (missing, unexpected and
    wrongly shaped tensors, in one line), or None. torch's own message for the same spans several lines."""
    parts = [f"missing {k!r}" for k in sorted(expected.keys() - saved.keys())]
    parts += [f"unexpected {k!r}" for k in sorted(saved.keys() - expected.keys())]
    parts += [
        f"{k!r} has shape {list(saved[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    return "; ".join(parts) or None


class ClosedFormAligner(Aligner):
    """A method computed in one step from the gathered training pairs (no epochs, nothing to resume)."""

    @classmethod
    @abc.abstractmethod
    def fit(cls, data: TrainingData, config: MethodConfig, seed: int) -> tuple[Aligner, dict[str, Any]]:
        """The fitted method and one flat dict of facts about the fit (pairs used, rank, ...) for run.json."""


@dataclass
class StepContext:
    """What a trained method's loss may need to know about the step: where it is in the run, and `gather`, which
    under data parallelism returns every rank's rows of a per-row tensor (only this rank's rows keep their gradient;
    identity in one process). A loss computed on gathered rows is the whole batch's loss on every rank."""

    epoch: int
    step: int
    steps_per_epoch: int
    gather: Callable[[Tensor, tuple[int, ...] | None], Tensor]
    finder: bool = False  # the LR finder's trial step, before any training step (a schedule has not started yet)


class TrainedAligner(Aligner):
    """A method trained by `align.loop`: it supplies parameters, a loss on a batch and its embed functions.

    `run_defaults` are the method's own epochs / batch_size / patience, used where the run config leaves them unset.
    `init_is_candidate`: the state after `setup` competes in early stopping (SOTAlign: its teacher), so training can
    only improve on it on the held-out pairs. `val_temperature` is the InfoNCE temperature of the held-out loss that
    early stopping watches (the same definition for every method: InfoNCE of `image_global` / `text_global`)."""

    Config: ClassVar[type[TrainedConfig]] = TrainedConfig
    run_defaults: ClassVar[dict[str, int]] = {"epochs": 30, "batch_size": 1024, "patience": 5}
    init_is_candidate: ClassVar[bool] = False

    @abc.abstractmethod
    def setup(self, data: TrainingData, seed: int) -> None:
        """Create the parameters (`nn.Parameter`s, seeded: every rank and every resumed run builds the same ones, in
        the same registration order, which `parameters()` and the checkpoint follow) and any fixed statistics of the
        training data (buffers)."""

    @abc.abstractmethod
    def loss(self, batch: Any, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        """The loss of one batch (the whole batch's, gathering per-row tensors with `ctx.gather`) and extra scalars
        to average into the epoch's record (e.g. the parts of a regularised loss)."""

    @property
    @abc.abstractmethod
    def val_temperature(self) -> float: ...

    def param_groups(self) -> list[list[Tensor]]:
        """The groups whose gradient norms `grad_clip_mode=per_group` clips one by one (default: one group, which is
        the same as global clipping). PAL: the image anchor bank and the text anchor bank."""
        return [list(self.parameters())]

    def batches(
        self, data: TrainingData, epoch: int, batch_size: int, seed: int, part: tuple[int, int] | None
    ) -> Iterator[Any]:
        """An epoch's batches; each has `.total` (pairs in the whole batch) and, under data parallelism, only this
        rank's part of the rows. Default: the training pairs, shuffled per epoch, one caption per image."""
        return data.train.batches(epoch, batch_size, seed, part=part)

    def epoch_rows(self, data: TrainingData) -> int:
        """Rows one epoch walks (for progress and pairs/s)."""
        return len(data.train)


def register_method(name: str, *, aliases: Iterable[str] = ()) -> Callable[[type[Aligner]], type[Aligner]]:
    """Class decorator: the method is found by `name` (`pipe align --method NAME`); `register_method("x")(Cls)` works
    the same. A name is registered once (extract/registry.py); the module must be listed in align/methods.py."""
    return METHODS.register(name, aliases=aliases)


def l2n(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-6)
