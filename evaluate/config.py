"""The frozen config of one evaluation and where its outputs go: RUN/eval/<name>.json and RUN/eval/figures/."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import check_name, write_text


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation, as the CLI resolved it; written into the result JSON under "config"."""

    task: str
    dataset: str
    split: str
    features: str
    run: str
    root: str | None = None
    protocol: str | None = None  # for tasks that take one (segmentation: "pal" or "standard"); None = the default
    options: tuple[tuple[str, Any], ...] = ()  # dataset options (-o KEY=VALUE)
    device: str = "cpu"
    figures: bool = True
    examples: int = 4  # images shown in each figure
    seed: int = 0  # the random mismatched captions of the diagnostics

    def __post_init__(self) -> None:
        """Absurd values are refused here, so every caller (the CLI, the demo, a script) gets the same one line."""
        for option, value in (("--dataset", self.dataset), ("--split", self.split)):
            if not value.strip():
                raise PipeError(f"{option} must not be empty")
            check_name(value, option)  # both become folders of the feature stores' paths
        if self.examples < 0:
            raise PipeError(f"--examples must be >= 0 (images shown in each figure), got {self.examples}")
        if self.seed < 0:
            raise PipeError(f"--seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d


def result_path(cfg: EvalConfig) -> Path:
    """RUN/eval/{task}-{dataset}-{split}[-{protocol}].json (clip_benchmark-style name from a template)."""
    parts = [cfg.task, cfg.dataset, cfg.split] + ([cfg.protocol] if cfg.protocol else [])
    name = "-".join(p.replace("/", "_").replace("\\", "_") for p in parts)
    return Path(cfg.run) / "eval" / f"{name}.json"


def figure_path(cfg: EvalConfig, what: str) -> Path:
    return result_path(cfg).parent / "figures" / f"{result_path(cfg).stem}-{what}.png"


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a half-written JSON would be taken for a finished eval by --skip-existing
    write_text(path, json.dumps(result, indent=2, default=str))
