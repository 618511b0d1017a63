"""The demo's claims step (docs/claims.md) on the world: grounding for every method, full PAL vs its pooled control,
the collapse diagnostic, unseen classes, and the falsification test. Glue only: every number comes from the same
stage functions as `pipe align`, `pipe eval` and `pipe claims`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from pipe_align.align.loop import RunConfig
from pipe_align.evaluate.config import EvalConfig, write_result
from pipe_align.evaluate.falsify import falsification

UNSEEN = "moon,cup,key"  # world classes left out of the unseen-classes protocol's training split


def run_claims(
    stages: Any,
    out: Path,
    method_runs: dict[str, Path],
    params: dict[str, dict],
    pal_run: RunConfig,
    base_run: RunConfig,
    n_train: int,
    n_val: int,
) -> list[Path]:
    """Every claims measurement on world val; returns the extra runs (pooled control, unseen-classes runs) for the
    report."""
    say, cfg, feats = typer.echo, stages.cfg, stages.feats
    val = {"size": n_val}
    stages.extract(cfg.text_encoder, "world", "val", val, text="phrases")
    runs = out / "runs"
    pal = method_runs["pal"]
    pal_cfg = json.loads((pal / "run.json").read_text())["config"]
    chosen = {k: pal_cfg[k] for k in ("anchors", "use_cls")}
    say("      claims: full PAL vs the pooled control (same settings, same loop)")
    pooled = stages.align(
        "pal", feats / "world" / "train", runs / "pal-pooled", pal_run, chosen | {"profile": "pooled"}
    ).path
    for task in ("classification", "retrieval", "segmentation"):
        stages.eval(task, pooled, "world", "val", val, protocol="pal" if task == "segmentation" else None)
    say("      claims: pointing game on world val for every method; collapse of PAL's similarity vectors")
    for run in [*method_runs.values(), pooled]:
        stages.eval("grounding", run, "world", "val", val)
    for run in (pal, pooled):
        stages.eval("collapse", run, "world", "val", val)
    say(f"      claims: unseen classes ({UNSEEN} never named in training)")
    unseen = {"size": n_train, "unseen": UNSEEN}
    # a store records its dataset options: the unseen split is another store set, in its own features folder
    seen_stages = type(stages)(cfg, out / "features-unseen")
    seen_stages.extract(cfg.image_encoder, "world", "train", unseen)
    seen_stages.extract(cfg.text_encoder, "world", "train", unseen, text="captions")
    unseen_runs = []
    for method, p in params.items():
        run_cfg = pal_run if method == "pal" else base_run
        res = stages.align(
            method,
            out / "features-unseen" / "world" / "train",
            runs / f"unseen-{method}",
            run_cfg,
            chosen if method == "pal" else p,
        )
        stages.eval("classification", res.path, "world", "val", val)
        unseen_runs.append(res.path)
    say("      claims: falsification test (per-image gain over the best global baseline vs grounding accuracy)")
    ecfg = EvalConfig(
        task="claims",
        dataset="world",
        split="val",
        features=str(feats),
        run=str(pal),
        options=tuple(sorted(val.items())),
        device=stages.device,
    )
    baselines = [str(r) for m, r in method_runs.items() if m != "pal"]
    path = pal / "eval" / "claims-world-val.json"
    if baselines and not path.is_file():
        found = falsification(ecfg, str(pal), baselines)
        write_result(
            path,
            {"task": "claims", "dataset": "world", "split": "val"}
            | found
            | {"config": ecfg.to_dict() | {"baselines": baselines}},
        )
    return [pooled, *unseen_runs]
