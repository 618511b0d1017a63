"""`pipe reproduce RECIPE`: extract -> align -> eval for everything a paper recipe names, then the table beside the
paper's published numbers (docs/reproduce.md).

Glue only: every stage is the stage function `pipe extract|align|eval` calls, with a typed config built from the
recipe. Resuming is theirs too: a complete store with the same origin is kept (`run_extract`), a finished run with
the same key is returned and a checkpoint continued (`run_align`, resume=True), an existing result is kept
(`run_eval`, skip_existing); anything stale or mismatched is refused by them with their one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from pipe_align.align.loop import RunConfig
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.evaluate.config import EvalConfig, result_path
from pipe_align.evaluate.context import PROTOCOL_PROMPTS
from pipe_align.evaluate.tasks import get_task, run_eval
from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.datasets.prompt_sets import has_pal_prompts
from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_text
from pipe_align.extract.remote import Remote, location
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.runtime import resolve_device

from .recipe import DatasetSpec, EvalSpec, MethodSpec, Recipe, check_datasets

TEXT_KIND = {"classification": "prompts", "segmentation": "prompts", "retrieval": "captions"}


@dataclass(frozen=True)
class ReproduceConfig:
    recipe: Recipe
    out: str
    features: str | None = None  # default OUT/features
    device: str = "auto"
    batch_size: int = 32  # rows per encoder forward
    only: tuple[str, ...] = ()  # dataset or method names to keep (the training set is always kept)
    skip: tuple[str, ...] = ()  # dataset or method names to leave out
    figures: bool = True
    progress: bool = True

    @property
    def feature_dir(self) -> Path | Remote:
        return location(self.features) if self.features else Path(self.out) / "features"


@dataclass
class Work:
    """Per stage: items computed now and items found complete (kept)."""

    done: int = 0
    kept: int = 0
    seconds: float = 0.0


@dataclass
class Summary:
    table_md: Path
    table_json: Path
    excluded: dict[str, str]  # dataset or method name -> why it was left out
    stages: dict[str, Work] = field(default_factory=dict)
    seconds: float = 0.0


def selection(recipe: Recipe, only: Sequence[str], skip: Sequence[str]) -> dict[str, str]:
    """Names (datasets and methods) left out by --only / --skip, with the reason the table will show."""
    datasets, methods = [d.name for d in recipe.datasets], [m.name for m in recipe.methods]
    for flag, names in (("--only", only), ("--skip", skip)):
        for n in names:
            if n not in datasets and n not in methods:
                raise PipeError(
                    f"{flag} {n}: not a dataset or method of recipe {recipe.name} (datasets: "
                    f"{', '.join(datasets)}; methods: {', '.join(methods)})"
                )
    out = {n: "--skip" for n in skip}
    for group in (datasets, methods):
        if any(n in only for n in group):
            out |= {n: "not in --only" for n in group if n not in only}
    if recipe.train.dataset in out:
        train = recipe.train.dataset
        raise PipeError(f"{out[train]} leaves out {train}, the training set; every method needs it")
    return out


def eval_prompts(r: Recipe, ev: EvalSpec) -> str | None:
    """The class-prompt set an eval will score with, decided before anything runs by the rule the eval applies to the
    stores (`evaluate.context.prompt_set_for`): its protocol's set (pal) where the PAL authors wrote prompts for the
    dataset's classes, else the standard one; None for an eval of captions."""
    if TEXT_KIND[ev.task] != "prompts":
        return None
    wanted = PROTOCOL_PROMPTS.get(ev.protocol or "")
    if wanted is None:
        return "standard"
    ds = r.dataset(ev.dataset)
    dataset = get_dataset(ds.reader, ds.root, ev.split, **dict(ds.options))  # the class list: a reader reads no images
    return wanted if has_pal_prompts(dataset.store_name or ds.reader, dataset.classes) else "standard"


def extract_configs(cfg: ReproduceConfig, evals: Sequence[EvalSpec]) -> list[ExtractConfig]:
    """Every store the training set and the kept evals read, once each (image + captions for pairs and retrieval,
    image + class prompts for classification and segmentation, in the prompt set each eval scores with)."""
    r = cfg.recipe
    enc = r.encoders
    wanted = [(r.train.dataset, r.train.split, "captions", None)]
    wanted += [(e.dataset, e.split, TEXT_KIND[e.task], e) for e in evals]
    if r.train.val_split is not None:  # the held-out pairs' stores, right after the training set's
        wanted.insert(1, (r.train.dataset, r.train.val_split, "captions", None))
    out: list[ExtractConfig] = []
    owner: dict[tuple[str, str], DatasetSpec] = {}
    for name, split, kind, ev in wanted:
        ds = r.dataset(name)
        other = owner.setdefault((ds.reader, split), ds)
        if (other.root, other.options, other.extract) != (ds.root, ds.options, ds.extract):
            raise PipeError(
                f"datasets {other.name} and {ds.name} of {r.path} both store {ds.reader}/{split} under "
                f"{cfg.feature_dir} from other data; give one of them its own --features folder"
            )
        settings = dict(ds.extract)
        prompts = eval_prompts(r, ev) if ev is not None else None
        if prompts is not None and settings.get("prompts", prompts) != prompts:
            raise PipeError(
                f"{r.path}: datasets.{name}.extract.prompts: {settings['prompts']!r}, but {ev.label} "
                f"scores with the {prompts} prompts; allowed: {prompts!r} (or leave it out)"
            )
        for encoder, text in ((enc.image, "auto"), (enc.text, kind)):
            extra = settings | ({"prompts": prompts} if prompts is not None and text == "prompts" else {})
            ec = ExtractConfig(
                encoder=encoder,
                dataset=ds.reader,
                split=split,
                features=str(cfg.feature_dir),
                root=ds.root,
                batch_size=cfg.batch_size,
                device=cfg.device,
                layer=enc.layer,
                max_length=enc.max_length,
                text=text,
                options=ds.options,
                crop=enc.crop,
                special_tokens=enc.special_tokens,
                **extra,
            )
            if ec not in out:
                out.append(ec)
    return out


def eval_config(cfg: ReproduceConfig, ev: EvalSpec, run: Path, device: str) -> EvalConfig:
    ds = cfg.recipe.dataset(ev.dataset)
    return EvalConfig(
        task=ev.task,
        dataset=ds.reader,
        split=ev.split,
        features=str(cfg.feature_dir),
        run=str(run),
        root=ds.root,
        protocol=ev.protocol,
        options=ds.options,
        device=device,
        figures=cfg.figures,
    )


def run_dir(cfg: ReproduceConfig, method: MethodSpec) -> Path:
    return Path(cfg.out) / "runs" / method.name


def run_reproduce(cfg: ReproduceConfig) -> Summary:
    t_all = time.perf_counter()
    r = cfg.recipe
    excluded = selection(r, cfg.only, cfg.skip)
    evals = [e for e in r.evals if e.dataset not in excluded]
    methods = [m for m in r.methods if m.name not in excluded]
    check_datasets(r, list(dict.fromkeys([r.train.dataset, *(e.dataset for e in evals)])))
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.json", json.dumps(dataclasses.asdict(r), indent=2, default=str))  # the resolved recipe
    if excluded:
        typer.echo("left out: " + ", ".join(f"{n} ({why})" for n, why in excluded.items()))
    stages: dict[str, Work] = {}
    stages["extract"], folders = _extract(cfg, evals)
    stages["align"] = _align(cfg, methods, folders)
    stages["eval"] = _eval(cfg, methods, evals, device)
    typer.echo("[4/4] table")
    cells = table_cells(cfg, excluded, device)
    md, js = out / "table.md", out / "table.json"
    write_text(md, to_markdown(r, cells, excluded))
    summary = Summary(md, js, excluded, stages, time.perf_counter() - t_all)
    write_text(
        js,
        json.dumps(
            {
                "recipe": r.name,
                "title": r.title,
                "source": r.source,
                "recipe_file": r.path,
                "unit": "percent",
                "encoders": dataclasses.asdict(r.encoders),
                "features": str(cfg.feature_dir),
                "excluded": excluded,
                "stages": {k: dataclasses.asdict(v) for k, v in stages.items()},
                "cells": cells,
            },
            indent=2,
        ),
    )
    typer.echo(md.read_text(encoding="utf-8").rstrip())
    work = ", ".join(f"{k} {v.done} done / {v.kept} kept" for k, v in stages.items())
    typer.echo(f"done in {summary.seconds:.1f} s ({work}): {md}, {js}")
    return summary


def _extract(cfg: ReproduceConfig, evals: Sequence[EvalSpec]) -> tuple[Work, dict[str, Path]]:
    """Every store; returns where `run_extract` put the training set's stores ("train") and the held-out split's
    ("val", when the recipe names one), for align."""
    r, w, t0 = cfg.recipe, Work(), time.perf_counter()
    paths = []
    stores = extract_configs(cfg, evals)
    typer.echo(f"[1/4] extract: {len(stores)} stores under {cfg.feature_dir} ({r.encoders.image} + {r.encoders.text})")
    for ec in stores:
        s = run_extract(ec, progress=cfg.progress)
        paths.append(location(s.path))
        w.kept += s.already_complete
        w.done += not s.already_complete
        state = "complete, kept" if s.already_complete else f"{s.written_rows} rows written"
        typer.echo(f"      {str(s.path)[len(str(cfg.feature_dir)) + 1 :]}: {s.rows} rows ({state})")
    w.seconds = time.perf_counter() - t0
    return w, pair_folders(r, stores, paths)


def pair_folders(r: Recipe, stores: Sequence[ExtractConfig], paths: Sequence[Path]) -> dict[str, Path]:
    """The folders of the training split's stores and of the held-out split's (extract_configs lists them first)."""
    reader = r.dataset(r.train.dataset).reader
    out = {}
    for ec, path in zip(stores, paths):
        for role, split in (("train", r.train.split), ("val", r.train.val_split)):
            if (ec.dataset, ec.split) == (reader, split) and role not in out:
                out[role] = path.parent
    return out


def align_run(cfg: ReproduceConfig, m: MethodSpec, folders: dict[str, Path]) -> RunConfig:
    """The method's run settings on this machine: the device, and the held-out split's folder when there is one."""
    val = str(folders["val"]) if "val" in folders else None
    return dataclasses.replace(m.run, device=cfg.device, val_shards=val)


def _align(cfg: ReproduceConfig, methods: Sequence[MethodSpec], folders: dict[str, Path]) -> Work:
    """Every method on the training set; resume=True continues an interrupted run from its checkpoint."""
    r, w, t0 = cfg.recipe, Work(), time.perf_counter()
    train = r.dataset(r.train.dataset)
    held = f", early stopping on {train.name}/{r.train.val_split}" if r.train.val_split else ""
    typer.echo(f"[2/4] align: {len(methods)} methods on {train.name}/{r.train.split}{held}")
    for m in methods:
        path = run_dir(cfg, m)
        before = _finished_stamp(path)
        acfg = AlignConfig(
            shards=str(folders["train"]),
            out=str(path),
            method=m.method,
            image_encoder=r.encoders.image,
            text_encoder=r.encoders.text,
            resume=True,
            run=align_run(cfg, m, folders),
            params=m.params,
            preset=m.preset,
        )
        res = run_align(acfg, progress=cfg.progress)
        kept = before is not None and before == _finished_stamp(path)
        w.kept += kept
        w.done += not kept
        state = "finished, kept" if kept else f"trained, {res.meta.get('wall_seconds', 0.0):.1f} s"
        typer.echo(f"      {m.name} ({m.method}): {res.meta['pairs']['train']} pairs ({state})")
    w.seconds = time.perf_counter() - t0
    return w


def _eval(cfg: ReproduceConfig, methods: Sequence[MethodSpec], evals: Sequence[EvalSpec], device: str) -> Work:
    w, t0 = Work(), time.perf_counter()
    typer.echo(f"[3/4] eval: {len(evals)} evaluations x {len(methods)} methods")
    for m in methods:
        for ev in evals:
            outcome = run_eval(eval_config(cfg, ev, run_dir(cfg, m), device), skip_existing=True)
            w.kept += outcome.skipped
            w.done += not outcome.skipped
            typer.echo(f"      {m.name}: {ev.label} ({'result kept' if outcome.skipped else 'evaluated'})")
    w.seconds = time.perf_counter() - t0
    return w


def _finished_stamp(run: Path) -> int | None:
    """run.json's mtime when it records a finished run: unchanged after run_align means the run was kept."""
    path = run / "run.json"
    try:
        return path.stat().st_mtime_ns if json.loads(path.read_text()).get("complete") else None
    except (OSError, ValueError, AttributeError):
        return None


def table_cells(cfg: ReproduceConfig, excluded: dict[str, str], device: str) -> list[dict[str, Any]]:
    """One cell per (method, eval, metric): measured and published (percent), measured - paper, and why a number is
    missing."""
    r = cfg.recipe
    cells = []
    for m in r.methods:
        for ev in r.evals:
            why = excluded.get(m.name) or excluded.get(ev.dataset)
            who = m.name if m.name in excluded else ev.dataset
            result = None
            if why is None:
                path = result_path(eval_config(cfg, ev, run_dir(cfg, m), device))
                result = json.loads(path.read_text(encoding="utf-8"))
            labels = dict(get_task(ev.task).columns)
            for metric in r.metrics(ev):
                paper = r.published(m.name, ev.task, ev.dataset, metric)
                measured, note = None, ""
                if why is not None:
                    note = f"not run: {who} left out ({why})"
                elif not isinstance(result.get(metric), (int, float)) or math.isnan(result[metric]):
                    note = f"no {metric} in the result ({ev.task} of {ev.dataset} does not produce it)"
                else:
                    measured = 100.0 * float(result[metric])
                if paper is None:
                    note = "; ".join(n for n in (note, "no published number") if n)
                diff = measured - paper if measured is not None and paper is not None else None
                cells.append(
                    {
                        "method": m.name,
                        "task": ev.task,
                        "dataset": ev.dataset,
                        "split": ev.split,
                        "protocol": ev.protocol,
                        "metric": metric,
                        "label": labels.get(metric, metric),
                        "measured": measured,
                        "paper": paper,
                        "diff": diff,
                        "note": note,
                    }
                )
    return cells


def _num(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else f"{v:+.1f}" if sign else f"{v:.1f}"


def to_markdown(r: Recipe, cells: list[dict[str, Any]], excluded: dict[str, str]) -> str:
    lines = [
        f"# {r.title}",
        "",
        f"Recipe `{r.name}` ({r.path}); source: {r.source or 'not given'}.",
        f"Encoders: {r.encoders.image} + {r.encoders.text}, layer {r.encoders.layer}. Percent; Δ = measured − paper.",
        "",
    ]
    if excluded:
        lines += ["Left out: " + ", ".join(f"{n} ({why})" for n, why in excluded.items()) + ".", ""]
    lines += [
        "| method | task | dataset | metric | measured | paper | Δ | note |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for c in cells:
        where = f"{c['dataset']}/{c['split']}" + (f" [{c['protocol']}]" if c["protocol"] else "")
        lines.append(
            f"| {c['method']} | {c['task']} | {where} | {c['label']} | {_num(c['measured'])} | "
            f"{_num(c['paper'])} | {_num(c['diff'], sign=True)} | {c['note']} |"
        )
    return "\n".join(lines) + "\n"
