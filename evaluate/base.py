"""The task registry: every evaluation is a `Task` subclass in its own file, registered by name with
`@register_task` and imported by name in evaluate/tasks.py. `run_eval` (tasks.py) looks the task up, opens what it
declares it reads, runs it, writes the result JSON and asks it for figures; `pipe report` asks the registered tasks
for their columns."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from pipe_align.extract.registry import Registry

from .context import EvalContext


class Task(abc.ABC):
    """One kind of evaluation. Subclasses declare what they read and report, and implement `run`."""

    name: ClassVar[str] = ""  # filled by @register_task; the `pipe eval <name>` command and the result's "task"
    text: ClassVar[str | None] = None  # text store read besides the image store: "prompts", "captions" or None
    protocols: ClassVar[dict[str, str]] = {}  # protocol -> note written into the result; first = default; {}: none
    extract_options: ClassVar[tuple[str, ...]] = ()  # `pipe extract` flags the image store needs (in error hints)
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()  # (result key, column label) that `pipe report` compares
    report_tag: ClassVar[str] = ""  # short tag before the column labels in the report ("seg")
    report_rank: ClassVar[int] = 100  # column groups of the report in increasing rank, ties by name

    @abc.abstractmethod
    def run(self, ctx: EvalContext) -> tuple[dict[str, Any], Any]:
        """(flat metrics as fractions, counts; extras for `figures`, or None)."""

    def figures(self, ctx: EvalContext, result: dict[str, Any], extras: Any, notes: list[str]) -> list[Path]:
        """PNG files drawn from the result and the extras of `run`; notes collects what a person should know (e.g.
        figures drawn without images)."""
        return []

    @staticmethod
    def figure_title(ctx: EvalContext, result: dict[str, Any]) -> str:
        """What every figure title names: "<run> (<method>) on <dataset>/<split>"."""
        return f"{result['run']} ({result['method']}) on {ctx.cfg.dataset}/{ctx.cfg.split}"


TASKS: Registry[type[Task]] = Registry("task", name_attr="name")


def register_task(name: str, *, aliases: Iterable[str] = ()) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a task reachable by name from `run_eval`, the CLI and the report (its module must be
    listed in evaluate/tasks.py). A name is registered once (extract/registry.py)."""
    return TASKS.register(name, aliases=aliases)
