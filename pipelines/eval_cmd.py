"""`pipe eval <task>` (one command per registered task) and `pipe report`. Glue only: options -> EvalConfig, then
print what `evaluate.tasks.run_eval` / `evaluate.report.write_report` return.

The commands are built from the task registry: a task file with a `@register_task` class is a new `pipe eval`
command, with the task's docstring summary as its help and `--protocol` where the task takes one (its choices and
default from the registry). The registry is read through `cli_spec` (no torch), and evaluate/ is imported only when a
command runs, so `--help` answers at once.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from . import cli_spec
from .options import parse_options

eval_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Evaluate a run on the feature stores of a dataset split."
)

SPEC = cli_spec.spec()  # the task registry and the dataset names, without importing them (no torch)
DATASET = typer.Option(..., help=f"Dataset name of the stores: {', '.join(SPEC['choices']['dataset'])}.")
ROOT = typer.Option(None, help="Dataset root folder (masks, images for figures; not needed for world).")
SPLIT = typer.Option("val", help="Dataset split.")
FEATURES = typer.Option(..., help="Root folder of the feature stores, or a URL (s3://bucket/features).")
RUN = typer.Option(..., help="Run dir written by `pipe align` (run.json, method.json, weights).")
SKIP = typer.Option(False, "--skip-existing", help="Do nothing when the result JSON already exists.")
OPTION = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE, as given to pipe extract (e.g. size=100).")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
FIGURES = typer.Option(True, help="Also draw PNG figures under RUN/eval/figures.")
EXAMPLES = typer.Option(4, help="Images shown in each figure.")
SEED = typer.Option(0, help="Seed of any random draw the task makes (diagnostics: the mismatched captions).")


def _run(
    task: str,
    dataset: str,
    root: str | None,
    split: str,
    features: str,
    run: Path,
    skip_existing: bool,
    option: list[str],
    device: str,
    figures: bool,
    examples: int,
    protocol: str | None = None,
    seed: int = 0,
) -> None:
    from pipe_align.evaluate.config import EvalConfig
    from pipe_align.evaluate.report import format_headline
    from pipe_align.evaluate.tasks import run_eval
    from pipe_align.extract.runtime import resolve_device

    cfg = EvalConfig(
        task=task,
        dataset=dataset,
        split=split,
        features=features,
        run=str(run),
        root=root,
        protocol=protocol,
        options=parse_options(option),
        device=resolve_device(device),
        figures=figures,
        examples=examples,
        seed=seed,
    )
    outcome = run_eval(cfg, skip_existing=skip_existing)
    if outcome.skipped:
        typer.echo(f"{outcome.path}: exists, skipped (--skip-existing)")
        return
    typer.echo(format_headline(outcome.result))
    for note in outcome.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {outcome.path}" + "".join(f"\nwrote {p}" for p in outcome.figures))


def _command(task: dict[str, Any]) -> None:
    """Register `pipe eval <task name>`: the common options, and --protocol where the task has protocols."""
    params = [
        ("dataset", str, DATASET),
        ("root", str | None, ROOT),
        ("split", str, SPLIT),
        ("features", str, FEATURES),
        ("run", Path, RUN),
    ]
    if task["protocols"]:
        names = task["protocols"]
        choices = ", ".join([f"{names[0]} (default)", *names[1:]])
        params.append(("protocol", str | None, typer.Option(None, help=f"{choices}: the protocol (docs/evaluate.md).")))
    params += [
        ("skip_existing", bool, SKIP),
        ("option", list[str], OPTION),
        ("device", str, DEVICE),
        ("figures", bool, FIGURES),
        ("examples", int, EXAMPLES),
        ("seed", int, SEED),
    ]

    def command(**kw: Any) -> None:
        _run(task["name"], **kw)

    command.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in params]
    )
    command.__annotations__ = {n: t for n, t, _ in params}
    command.__doc__ = task["summary"]
    eval_app.command(task["name"])(command)


for _task in SPEC["tasks"]:
    _command(_task)


def report(
    runs: list[Path] = typer.Argument(..., help="Run dirs with evaluations (RUN/eval/*.json)."),
    out: Path | None = typer.Option(
        None, help="Markdown file to write (the CSV goes beside it); default RUN/../report.md for the first RUN."
    ),
) -> None:
    """One comparison table of all evaluated runs, printed and written as Markdown and CSV."""
    from pipe_align.evaluate.report import write_report

    md, csv_path, text = write_report(list(runs), out)
    typer.echo(text, nl=False)
    typer.echo(f"wrote {md}\nwrote {csv_path}")
