"""The one interface every alignment method implements, so training and evaluation never special-case a method.

A method is a class registered with `@register_method("name")`. It is fitted from a `PairSource` (paired rows of
an image store and a caption store) and maps store rows into a shared space:

    image_global(ImageRows) -> [N, E]      text_global(TextRows) -> [M, E]      image_dense(patches) -> [N, P, E]

Similarity is always the dot product of L2-normalised outputs (methods return normalised embeddings), and dense
class scores are `image_dense(patches) @ text_global(prompts).T`. `save(dir)` writes `weights.safetensors` (PAL:
`anchors.safetensors`) plus `method.json`; `load_aligner(dir)` reads any method back.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError

METHODS: dict[str, type[Aligner]] = {}


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


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config; subclasses add their hyper-parameters (all become CLI options)."""

    seed: int = 0


class Aligner(abc.ABC):
    """A fitted alignment. Subclasses set `name`, `Config`, `needs_tokens` and implement the abstract methods."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_tokens: ClassVar[bool] = False  # whether fit / *_global read token arrays (not just cls / pooled)

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @classmethod
    @abc.abstractmethod
    def fit(
        cls, train: Any, val: Any | None, config: MethodConfig, log: Callable[[dict], None],
        unpaired: tuple[ImageRows, TextRows] | None = None,
    ) -> Aligner:  # fmt: skip
        """Fit on a PairSource (`align.data`); `val` (a PairSource or None) is for early stopping; `log` receives one
        flat dict of metrics per epoch (closed-form methods call it once); `unpaired` holds extra unpaired image and
        text rows for methods that use them (SOTAlign)."""

    @abc.abstractmethod
    def image_global(self, rows: ImageRows) -> Tensor:
        """[N, E] L2-normalised embeddings of whole images."""

    @abc.abstractmethod
    def text_global(self, rows: TextRows) -> Tensor:
        """[M, E] L2-normalised embeddings of captions or prompts."""

    @abc.abstractmethod
    def image_dense(self, patches: Tensor) -> Tensor:
        """[N, P, E] per-patch embeddings (or scores) whose dot product with `text_global` gives class scores."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that define the fitted method (saved as safetensors)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    weights_file: ClassVar[str] = "weights.safetensors"

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / self.weights_file))
        meta = {"method": self.name, "config": asdict(self.config)} | (extra or {})
        (out / "method.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> Aligner:
        names = {f.name for f in fields(cls.Config)}
        return cls(cls.Config(**{k: v for k, v in config.items() if k in names}))


def register_method(name: str) -> Callable[[type[Aligner]], type[Aligner]]:
    def deco(cls: type[Aligner]) -> type[Aligner]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Aligner]:
    import pipe_align.align.methods  # noqa: F401 - importing fills the registry

    if name not in METHODS:
        raise PipeError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def load_aligner(run: str | Path, device: str = "cpu") -> Aligner:
    """Read any method's run dir back (method.json names the class)."""
    from safetensors.torch import load_file

    run = Path(run)
    meta_path = run / "method.json"
    if not meta_path.exists():
        raise PipeError(f"{run}: not a run dir (no method.json); train one with `pipe align`")
    meta = json.loads(meta_path.read_text())
    cls = get_method(meta["method"])
    aligner = cls.from_config_dict(meta.get("config", {}))
    weights = run / cls.weights_file
    if not weights.exists():
        raise PipeError(f"{run}: {cls.weights_file} is missing (training did not finish?)")
    aligner.load_state_dict({k: v.to(device) for k, v in load_file(str(weights)).items()})
    return aligner


def l2n(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-6)
