"""`run_eval(cfg)`: look the task up, open what it reads, run it, write RUN/eval/<name>.json and its figures.

The result JSON is flat: identification (task, dataset, split, protocol, method, run), the task's metrics as
fractions, counts, and "config" (the EvalConfig plus the resolved stores, encoders, grid and resize).

Importing this module imports every task module by name (the list below), so a new task is one more file plus one
import line, and `pipe eval <name>` appears for it (pipelines/eval_cmd.py builds the commands from the registry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipe_align.extract.errors import PipeError

from . import (  # noqa: F401  (each import registers its task; keep sorted)
    classification,
    collapse,
    diagnostics,
    grounding,
    retrieval,
    segmentation,
)
from .base import TASKS, Task
from .config import EvalConfig, result_path, write_result
from .context import load_context


def get_task(name: str) -> type[Task]:
    """The task registered under `name`; an unknown name lists the valid ones."""
    return TASKS.get(name)


def all_tasks() -> list[type[Task]]:
    """Every registered task, in report order (report_rank, then name)."""
    return sorted(TASKS.values(), key=lambda t: (t.report_rank, t.name))


def resolve_protocol(task: type[Task], cfg: EvalConfig) -> EvalConfig:
    """cfg with the task's default protocol filled in; a protocol the task does not know is a user error."""
    if not task.protocols:
        if cfg.protocol is not None:
            takes = [t.name for t in all_tasks() if t.protocols]
            raise PipeError(f"--protocol applies to {', '.join(takes) or 'no task'} only, not {task.name}")
        return cfg
    if cfg.protocol is None:
        return replace(cfg, protocol=next(iter(task.protocols)))
    if cfg.protocol not in task.protocols:
        raise PipeError(f"--protocol must be one of {', '.join(task.protocols)}, got {cfg.protocol!r}")
    return cfg


def is_result(path: Path, task: str) -> bool:
    """Whether `path` holds a result JSON of `task` (what --skip-existing may keep)."""
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(res, dict) and res.get("task") == task


@dataclass
class EvalOutcome:
    path: Path
    result: dict[str, Any] | None = None  # None when skipped
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return self.result is None


def run_eval(cfg: EvalConfig, skip_existing: bool = False) -> EvalOutcome:
    """Evaluate one run on one dataset split; cfg.protocol None means the task's default protocol."""
    task_cls = get_task(cfg.task)
    cfg = resolve_protocol(task_cls, cfg)
    path = result_path(cfg)
    redo = []
    if skip_existing and path.is_file():
        if is_result(path, cfg.task):
            return EvalOutcome(path)
        redo.append(f"{path} exists but is not a readable {cfg.task} result; evaluated again")
    task = task_cls()
    ctx = load_context(cfg, task.text, task.extract_options)
    outcome = EvalOutcome(path, notes=redo + ctx.notes)
    metrics, extras = task.run(ctx)
    result: dict[str, Any] = {"task": cfg.task, "dataset": cfg.dataset, "split": cfg.split}
    if cfg.protocol:
        result |= {"protocol": cfg.protocol, "protocol_note": task.protocols[cfg.protocol]}
    result |= {"method": ctx.method, "run": Path(cfg.run).resolve().name} | metrics
    result["config"] = cfg.to_dict() | ctx.info
    if cfg.figures and extras is not None:
        outcome.figures = task.figures(ctx, result, extras, outcome.notes)
    write_result(path, result)
    outcome.result = result
    return outcome
