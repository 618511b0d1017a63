"""`pipe eval classification|retrieval|segmentation|diagnostics` and `pipe report`. Glue only: options -> EvalConfig,
then print what `pipe_align.evaluate.tasks.run_eval` / `evaluate.report.write_report` return.

One command per registered task (typer needs explicit signatures). What the task registry knows (which task takes
a protocol, its choices and default, the result's columns) is resolved by `run_eval`, not repeated here; the help
strings stay literal so that `pipe --help` does not import torch (tests/test_eval.py checks them against the
registry).
"""

from __future__ import annotations

from pathlib import Path

import typer

eval_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Evaluate a run on the feature stores of a dataset split.")  # fmt: skip

DATASET = typer.Option(..., help="Dataset name of the stores (voc, coco, flickr30k, world, ...).")
ROOT = typer.Option(None, help="Dataset root folder (masks, images for figures; not needed for world).")
SPLIT = typer.Option("val", help="Dataset split.")
FEATURES = typer.Option(..., help="Root folder of the feature stores.")
RUN = typer.Option(..., help="Run dir written by `pipe align` (run.json, method.json, weights).")
SKIP = typer.Option(False, "--skip-existing", help="Do nothing when the result JSON already exists.")
OPTION = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE, as given to pipe extract (e.g. size=100).")
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
FIGURES = typer.Option(True, help="Also draw PNG figures under RUN/eval/figures.")
EXAMPLES = typer.Option(4, help="Images shown in each figure.")


def _run(task: str, dataset: str, root: str | None, split: str, features: Path, run: Path, skip_existing: bool,
         option: list[str], device: str, figures: bool, examples: int, protocol: str | None = None,
         seed: int = 0) -> None:  # fmt: skip
    from pipe_align.evaluate.config import EvalConfig
    from pipe_align.evaluate.report import format_headline
    from pipe_align.evaluate.tasks import run_eval
    from pipe_align.extract.job import resolve_device
    from pipe_align.pipelines.options import parse_options

    cfg = EvalConfig(
        task=task, dataset=dataset, split=split, features=str(features), run=str(run), root=root, protocol=protocol,
        options=parse_options(option), device=resolve_device(device), figures=figures, examples=examples, seed=seed,
    )  # fmt: skip
    outcome = run_eval(cfg, skip_existing=skip_existing)
    if outcome.skipped:
        typer.echo(f"{outcome.path}: exists, skipped (--skip-existing)")
        return
    typer.echo(format_headline(outcome.result))
    for note in outcome.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {outcome.path}" + "".join(f"\nwrote {p}" for p in outcome.figures))


@eval_app.command()
def classification(dataset: str = DATASET, root: str | None = ROOT, split: str = SPLIT, features: Path = FEATURES,
                   run: Path = RUN, skip_existing: bool = SKIP, option: list[str] = OPTION, device: str = DEVICE,
                   figures: bool = FIGURES, examples: int = EXAMPLES) -> None:  # fmt: skip
    """Zero-shot classification with the class-prompt store: acc1, acc5, balanced accuracy."""
    _run("classification", dataset, root, split, features, run, skip_existing, option, device, figures, examples)


@eval_app.command()
def retrieval(dataset: str = DATASET, root: str | None = ROOT, split: str = SPLIT, features: Path = FEATURES,
              run: Path = RUN, skip_existing: bool = SKIP, option: list[str] = OPTION, device: str = DEVICE,
              figures: bool = FIGURES, examples: int = EXAMPLES) -> None:  # fmt: skip
    """Image-text retrieval with the caption store: recall@1/5/10 both ways."""
    _run("retrieval", dataset, root, split, features, run, skip_existing, option, device, figures, examples)


@eval_app.command()
def segmentation(dataset: str = DATASET, root: str | None = ROOT, split: str = SPLIT, features: Path = FEATURES,
                 run: Path = RUN, protocol: str | None = typer.Option(None, help="pal (default) or standard: the "
                                                                   "label-space protocol (docs/evaluate.md)."),
                 skip_existing: bool = SKIP, option: list[str] = OPTION, device: str = DEVICE,
                 figures: bool = FIGURES, examples: int = EXAMPLES) -> None:  # fmt: skip
    """Zero-shot segmentation from patch tokens and class prompts: mIoU, fg mIoU, per-class IoU, aAcc."""
    _run("segmentation", dataset, root, split, features, run, skip_existing, option, device, figures, examples,
         protocol=protocol)  # fmt: skip


@eval_app.command()
def diagnostics(dataset: str = DATASET, root: str | None = ROOT, split: str = SPLIT, features: Path = FEATURES,
                run: Path = RUN, skip_existing: bool = SKIP, option: list[str] = OPTION, device: str = DEVICE,
                figures: bool = FIGURES, examples: int = EXAMPLES,
                seed: int = typer.Option(0, help="Seed of the random mismatched captions.")) -> None:  # fmt: skip
    """Anchor methods only: anchor usage, top-5 anchor Dice (matched vs mismatched pairs), activation maps."""
    _run("diagnostics", dataset, root, split, features, run, skip_existing, option, device, figures, examples,
         seed=seed)  # fmt: skip


def report(
    runs: list[Path] = typer.Argument(..., help="Run dirs with evaluations (RUN/eval/*.json)."),
    out: Path | None = typer.Option(None, help="Markdown file to write (the CSV goes beside it); default "
                                               "RUN/../report.md for the first RUN."),
) -> None:  # fmt: skip
    """One comparison table of all evaluated runs, printed and written as Markdown and CSV."""
    from pipe_align.evaluate.report import write_report

    md, csv_path, text = write_report(list(runs), out)
    typer.echo(text, nl=False)
    typer.echo(f"wrote {md}\nwrote {csv_path}")
