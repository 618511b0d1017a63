"""`pipe claims`: the paper's falsification test on one dataset split (glue: evaluate/falsify.py computes it)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from . import cli_spec
from .options import parse_options

GROUNDING = ", ".join(cli_spec.spec()["choices"]["grounding"])  # readers with phrase boxes, from the registry


def claims(
    pal: Path = typer.Option(..., help="PAL run dir."),
    baseline: list[Path] = typer.Option(..., help="Baseline run dirs (repeat); the best by image->text R@1 is used."),
    dataset: str = typer.Option(..., help=f"Dataset with phrase boxes: {GROUNDING}."),
    split: str = typer.Option("test", help="Dataset split."),
    features: Path = typer.Option(..., help="Root folder of the feature stores."),
    root: str | None = typer.Option(None, help="Dataset root folder (not needed for world)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE, as extracted."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    seed: int = typer.Option(0, help="Seed of the permutation test."),
) -> None:
    """Per image: PAL's retrieval-rank gain over the best global baseline against its grounding accuracy; writes
    PAL_RUN/eval/claims-<dataset>-<split>.json and prints whether the claim holds on this data."""
    from pipe_align.evaluate.config import EvalConfig, write_result
    from pipe_align.evaluate.falsify import falsification

    cfg = EvalConfig(
        task="claims",
        dataset=dataset,
        split=split,
        features=str(features),
        run=str(pal),
        root=root,
        options=parse_options(option),
        device=device,
        seed=seed,
    )
    found = falsification(cfg, str(pal), [str(b) for b in baseline])
    res = {"task": "claims", "dataset": dataset, "split": split} | found
    path = Path(pal) / "eval" / f"claims-{dataset}-{split}.json"
    write_result(path, res | {"config": cfg.to_dict() | {"baselines": [str(b) for b in baseline]}})
    typer.echo(json.dumps(res, indent=2))
    typer.echo(f"wrote {path}")
