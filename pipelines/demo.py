"""`pipe demo`: the whole pipeline on the built-in world, through the stage functions the `pipe` commands call.

extract (train captions, val captions + class prompts) -> align (PAL with `pipe align`'s automatic choice: on a few
hundred pairs the `small` preset picks K and the token set on the held-out pairs of the train split,
align/pal_presets.py; then every baseline) -> eval (classification, retrieval, segmentation `pal` protocol on world val;
the background rules' values picked on world train's masks and shown on val) -> report. World val is also written
as JPEG files (`OUT/world/val2017`) to try `pipe segment|classify|search` on. Re-running reuses finished stores,
runs and evaluations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from pipe_align.align.loop import RunConfig
from pipe_align.align.methods import method_names
from pipe_align.align.run import AlignConfig, AlignResult, run_align
from pipe_align.evaluate.background import RULES, before_after_figure, scan
from pipe_align.evaluate.config import EvalConfig
from pipe_align.evaluate.report import write_report
from pipe_align.evaluate.tasks import run_eval
from pipe_align.extract.datasets import get_dataset, write_world
from pipe_align.extract.datasets.fashion_mnist import FASHION_CLASSES
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.runtime import resolve_device

from .demo_claims import run_claims
from .demo_semi import run_semi

SIZES = {"small": (48, 16), "full": (400, 100)}  # world images: train, val
FASHION = {"small": (3, 2), "full": (40, 30)}  # Fashion-MNIST images per class: train (7 seen classes), test (all 10)
SEEN = (0, 1, 2, 3, 4, 5, 6)
VAL_FRACTION = 0.1  # held-out train pairs: early stopping and the settings each method is picked by
# Each baseline gets a small grid too, picked like PAL's K on held-out train pairs, so no method is left at a default
# that overfits a few hundred pairs (closed-form CCA/CSA at full rank and tiny ridge do).
BASELINE_GRID: dict[str, tuple[dict, ...]] = {
    "cca": ({}, {"reg": 0.1}, {"reg": 0.1, "rank": 32}),
    "csa": ({}, {"reg": 0.1}, {"reg": 0.1, "rank": 32}),
    "asif": ({}, {"k": 100}),
    "linear": ({}, {"structure_weight": 10.0}),
    "mlp": ({}, {"structure_weight": 10.0}),
}

PAL_VARIANTS = ("pal", "pal-fixed")  # trained by the demo as PAL, or not at all (pal-fixed)


def _run_name(method: str, params: dict) -> str:
    return "-".join([method, *(f"{k}{v}" for k, v in sorted(params.items()))]) if params else method


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    size: str = "full"
    image_encoder: str = "dinov2-small"
    text_encoder: str = "minilm"
    batch_size: int = 16
    pal_epochs: int | None = None  # given: wins over the preset's step budget (a quick demo); None: the preset's
    methods: tuple[str, ...] | None = None  # baselines to run (default: every registered one)
    progress: bool = True


class Stages:
    """The stage functions with the demo's fixed settings: typed configs in, typed results out."""

    def __init__(self, cfg: DemoConfig, feats: Path) -> None:
        self.cfg, self.feats = cfg, feats
        self.device = resolve_device("auto")

    def extract(self, encoder: str, dataset: str, split: str, options: dict, text: str = "auto") -> None:
        ecfg = ExtractConfig(
            encoder=encoder,
            dataset=dataset,
            split=split,
            features=str(self.feats),
            text=text,
            batch_size=self.cfg.batch_size,
            options=tuple(sorted(options.items())),
        )
        summary = run_extract(ecfg, progress=self.cfg.progress)
        done = "already complete" if summary.already_complete else f"{summary.written_rows} rows written"
        typer.echo(f"      {summary.path}: {summary.rows} rows ({done})")

    def align(self, method: str, shards: Path, out: Path, run: RunConfig, params: dict) -> AlignResult:
        acfg = AlignConfig(shards=str(shards), out=str(out), method=method, run=run, params=params)
        try:
            return run_align(acfg, progress=self.cfg.progress)
        except PipeError as e:
            if "finished run with other settings or data" not in str(e):
                raise
            raise PipeError(
                f"{out}: a run of another version of the demo or of other data (its settings differ); "
                f"remove {self.cfg.out} (or that run dir) and run the demo again"
            ) from None

    def eval(
        self,
        task: str,
        run: Path,
        dataset: str,
        split: str,
        options: dict,
        protocol: str | None = None,
        figures: bool = True,
    ) -> dict:
        ecfg = EvalConfig(
            task=task,
            dataset=dataset,
            split=split,
            features=str(self.feats),
            run=str(run),
            protocol=protocol,
            options=tuple(sorted(options.items())),
            device=self.device,
            figures=figures,
        )
        outcome = run_eval(ecfg, skip_existing=True)
        return outcome.result if outcome.result is not None else json.loads(outcome.path.read_text())


def run_demo(cfg: DemoConfig) -> Path:
    if cfg.size not in SIZES:
        raise PipeError(f"--size must be one of {', '.join(SIZES)}, got {cfg.size!r}")
    out = Path(cfg.out)
    feats, runs = out / "features", out / "runs"
    n_train, n_val = SIZES[cfg.size]
    stages = Stages(cfg, feats)
    say = typer.echo
    fashion_ok = _fashion_available()
    steps = 6 if fashion_ok else 5
    step = iter(range(1, steps + 1))

    encs = f"{cfg.image_encoder} + {cfg.text_encoder}"
    say(f"[{next(step)}/{steps}] extract: world train ({n_train} images) and val ({n_val}) with {encs}")
    for split, n in (("train", n_train), ("val", n_val)):
        stages.extract(cfg.image_encoder, "world", split, {"size": n})
        stages.extract(cfg.text_encoder, "world", split, {"size": n}, text="captions")
        if split == "val":
            stages.extract(cfg.text_encoder, "world", split, {"size": n}, text="prompts")

    shards = feats / "world" / "train"
    # One held-out split for every method (RunConfig's seed and val fraction); PAL: `pipe align`'s own choice.
    base_run = RunConfig(val_fraction=VAL_FRACTION)
    pal_run = RunConfig(val_fraction=VAL_FRACTION, epochs=cfg.pal_epochs)
    say(f"[{next(step)}/{steps}] align: PAL (preset auto: settings picked on held-out train pairs), then the baselines")
    pal = stages.align("pal", shards, runs / "pal", pal_run, {})
    preset = pal.meta["preset"]
    say(f"      pal preset {preset['summary']}")
    ablation = [
        {"K": t["anchors"], "use_cls": t["use_cls"], "val_r1": t["heldout_mean_r1"]} for t in preset.get("tried", [])
    ]
    chosen = {"K": pal.meta["config"]["anchors"], "run": str(pal.path)}
    # the baselines: every method but PAL and its fixed-anchor variant (a PAL ablation for the paper's 83k pairs)
    baselines = cfg.methods if cfg.methods is not None else tuple(m for m in method_names() if m not in PAL_VARIANTS)
    method_runs = {"pal": pal.path}
    selection = {
        "pal": {
            "params": {k: pal.meta["config"][k] for k in ("anchors", "use_cls")},
            "heldout_mean_r1": pal.heldout_mean_r1,
            "preset": preset["name"],
        }
    }
    for m in baselines:
        tried = []
        for params in BASELINE_GRID.get(m, ({},)):
            res = stages.align(m, shards, runs / _run_name(m, params), base_run, params)
            tried.append((res.heldout_mean_r1, res.path, params))
        best = max(tried, key=lambda t: t[0])
        method_runs[m] = best[1]
        selection[m] = {"params": best[2], "heldout_mean_r1": best[0], "tried": [[t[2], t[0]] for t in tried]}
    (out / "selection.json").write_text(json.dumps(selection, indent=2))
    say("      picked on held-out train pairs: " + ", ".join(str(r.name) for r in method_runs.values()))

    say(f"[{next(step)}/{steps}] eval on world val: classification, retrieval, segmentation (pal protocol)")
    world_val = {"size": n_val}
    for run in method_runs.values():
        for task in ("classification", "retrieval", "segmentation"):
            stages.eval(task, run, "world", "val", world_val, protocol="pal" if task == "segmentation" else None)
    stages.eval("diagnostics", Path(chosen["run"]), "world", "val", world_val)
    _write_ablation(out, ablation, chosen)
    say("      background: rules picked on world train, applied to world val (background.png)")
    _background(stages, out, Path(chosen["run"]), n_train, n_val)
    _world_files(out, n_val)

    if fashion_ok:
        say(
            f"[{next(step)}/{steps}] fashion-mnist: zero-shot transfer, trained on captions of 7 classes, tested on "
            "all 10"
        )
        _fashion_transfer(
            cfg, stages, out, base_run, pal_run, {m: v["params"] for m, v in selection.items() if m != "pal"}
        )
    else:
        say("      fashion-mnist transfer skipped: dataset-fashion-mnist is not installed (`make fashion-mnist`)")

    run_semi(stages, out, cfg.size, n_val)  # SOTAlign's semi-supervised setting (pipelines/demo_semi.py)
    say(f"[{next(step)}/{steps}] claims of the PAL paper on world val (docs/claims.md)")
    params = {"pal": {}} | {m: v["params"] for m, v in selection.items() if m != "pal"}
    extra = run_claims(stages, out, method_runs, params, pal_run, base_run, n_train, n_val)
    say(f"[{next(step)}/{steps}] report")
    _, _, table = write_report(list(method_runs.values()), out / "report.md", claim_runs=tuple(extra))
    say(table.rstrip())
    if fashion_ok:
        say(f"fashion-mnist transfer: {out / 'fashion_mnist.md'}")
        say((out / "fashion_mnist.md").read_text())
    say(f"done: report {out / 'report.md'}, K ablation {out / 'k_ablation.png'}, runs and figures under {runs}")
    return out


def _write_ablation(out: Path, ablation: list[dict], chosen: dict) -> None:
    """The preset's probes: held-out mean R@1 (its selection criterion) per K, patches only and CLS pooled."""
    from matplotlib.figure import Figure  # a bare Figure: the caller's matplotlib backend stays as it is

    (out / "k_ablation.json").write_text(json.dumps({"chosen": chosen["K"], "grid": ablation}, indent=2))
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    ks = sorted({a["K"] for a in ablation}) or [chosen["K"]]
    for cls, mark in ((False, "o-"), (True, "s")):
        pts = sorted((a["K"], a["val_r1"]) for a in ablation if a["use_cls"] == cls)
        if pts:
            label = "CLS + patches" if cls else "patches only"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], mark, label=f"held-out mean R@1, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("anchors K")
    ax.set_ylabel("held-out mean R@1 (fraction)")
    ax.set_title(f"PAL preset probes (chosen K = {chosen['K']})")
    if ablation:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "k_ablation.png")


def _background(stages: Stages, out: Path, run: Path, n_train: int, n_val: int) -> dict:
    """Pick each background rule's value (evaluate/background.py) by fg mIoU on world train, whose masks no reported
    number uses, then segment world val under the eval's rule and under each picked rule. Val's own best values are
    recorded only as a reference for how far the train picks are from them."""
    cfg = stages.cfg
    stages.extract(cfg.text_encoder, "world", "train", {"size": n_train}, text="prompts")
    train = EvalConfig(
        task="segmentation",
        dataset="world",
        split="train",
        features=str(stages.feats),
        run=str(run),
        protocol="pal",
        options=(("size", n_train),),
        device=stages.device,
        examples=0,
    )
    val_cfg = replace(train, split="val", options=(("size", n_val),), examples=4)
    result: dict = {"run": str(run), "picked_on": f"world train ({n_train} images)", "rules": {}}
    columns, examples = ["background competes (eval's rule)"], None
    for rule in RULES:
        picked = scan(train, rule)
        val = scan(val_cfg, rule, [None] if picked.best is None else [None, picked.best])
        own = scan(replace(val_cfg, examples=0), rule)
        result["rules"][rule] = {
            "picked": picked.best,
            "val": val.to_dict(),
            "train_scan": picked.to_dict(),
            "val_own_best": {rule: own.best, "fg_mIoU": max(own.fg_miou)},
        }
        result["val_fg_mIoU"] = val.fg_miou[0]  # the eval's rule: the same under every scan
        examples = examples or [(item, mask, [preds[0]]) for item, mask, preds in val.examples]
        if picked.best is not None:
            columns.append(f"+ {rule} {picked.best:.3f}")
            for ex, (_, _, preds) in zip(examples, val.examples):
                ex[2].append(preds[1])
        after = (
            f"{100 * val.fg_miou[-1]:.1f} with {rule} {picked.best:.3f}"
            if picked.best is not None
            else f"no {rule} helps on train"
        )
        typer.echo(f"      world val fg mIoU {100 * val.fg_miou[0]:.1f} (background prompt competes); {after}")
    (out / "background.json").write_text(json.dumps(result, indent=2))
    before_after_figure(
        out / "background.png",
        val_cfg,
        val.classes,
        columns,
        examples,
        f"{run.name} on world val: background rules picked on world train",
    )
    return result


def _world_files(out: Path, n_val: int) -> None:
    """World val as JPEG files (out/world/val2017), for trying `pipe segment|classify|search` on them."""
    folder = out / "world" / "val2017"
    if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != n_val:
        write_world(out / "world", "val", size=n_val, layouts=("coco",))


def _fashion_available() -> bool:
    try:
        get_dataset("fashion-mnist", None, "test")
    except PipeError:
        return False
    return True


def _fashion_transfer(
    cfg: DemoConfig, stages: Stages, out: Path, base_run: RunConfig, pal_run: RunConfig, baselines: dict[str, dict]
) -> None:
    """Fashion-MNIST (Debian's dataset-fashion-mnist): align on templated captions of the 7 seen classes, then
    zero-shot classify the test images of all 10 classes; the 3 unseen classes measure transfer."""
    runs = out / "runs-fashion"
    n_train, n_test = FASHION[cfg.size]
    train = {"per_class": n_train, "classes": ",".join(map(str, SEEN)), "captions": True}
    test = {"per_class": n_test}
    stages.extract(cfg.image_encoder, "fashion-mnist", "train", train)
    stages.extract(cfg.text_encoder, "fashion-mnist", "train", train, text="captions")
    stages.extract(cfg.image_encoder, "fashion-mnist", "test", test)
    stages.extract(cfg.text_encoder, "fashion-mnist", "test", test, text="prompts")
    shards = stages.feats / "fashion-mnist" / "train"
    method_runs = {"pal": stages.align("pal", shards, runs / "pal", pal_run, {}).path}  # preset auto, as on the world
    for m, params in baselines.items():  # each with the settings picked on the world's held-out pairs
        method_runs[m] = stages.align(m, shards, runs / _run_name(m, params), base_run, params).path
    rows = []
    for run in method_runs.values():
        res = stages.eval("classification", run, "fashion-mnist", "test", test, figures=False)
        per = [res.get(f"acc/{c}") for c in FASHION_CLASSES]
        seen_acc = [per[i] for i in SEEN if per[i] is not None]
        unseen_acc = [p for i, p in enumerate(per) if i not in SEEN and p is not None]
        rows.append(
            {
                "method": run.name,
                "run": str(run),
                "acc1": res["acc1"],
                "balanced_acc": res["balanced_acc"],
                "seen_acc": sum(seen_acc) / len(seen_acc),
                "unseen_acc": sum(unseen_acc) / len(unseen_acc),
                "per_class": dict(zip(FASHION_CLASSES, per)),
            }
        )
    (out / "fashion_mnist.json").write_text(json.dumps(rows, indent=2))
    unseen = ", ".join(c for i, c in enumerate(FASHION_CLASSES) if i not in SEEN)
    lines = [
        f"Fashion-MNIST test, {n_test} images per class; trained on captions of 7 classes ({n_train} images each);"
        f" unseen: {unseen}. PAL: preset auto. Percent.",
        "",
        "| method | acc1 (10 classes) | balanced acc | seen classes (7) | unseen classes (3) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['acc1']:.1f} | {100 * r['balanced_acc']:.1f} | "
            f"{100 * r['seen_acc']:.1f} | {100 * r['unseen_acc']:.1f} |"
        )
    (out / "fashion_mnist.md").write_text("\n".join(lines) + "\n")
