"""`pipe demo --size small` end to end with tiny random encoders: every stage writes its outputs, metrics in range."""

import csv
import json
from pathlib import Path

from pipe_align.align.pal_presets import K_GRID
from pipe_align.pipelines.cli import main


def test_demo_small_end_to_end(tmp_path, tiny_dinov2, tiny_bert):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--size",
        "small",
        "--image-encoder",
        f"hf:{tiny_dinov2}",
        "--text-encoder",
        f"hf:{tiny_bert}",
        "--pal-epochs",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    feats = out / "features" / "world"
    for split, n in (("train", 3), ("val", 4)):
        stores = sorted(p.name for p in (feats / split).glob("*.zarr"))
        # image, captions, class prompts (train: for the background threshold); val: the phrases for grounding too
        assert len(stores) == n, stores
    ablation = json.loads((out / "k_ablation.json").read_text())  # the probes of pipe align's small-data preset
    assert [a["K"] for a in ablation["grid"]][: len(K_GRID)] == list(K_GRID) and (out / "k_ablation.png").exists()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert "pal" in runs
    chosen = out / "runs" / "pal"
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    evaluated = {out / "runs" / r["run"] for r in rows}
    for task in ("classification", "retrieval", "segmentation"):
        for run in evaluated:
            name = f"{task}-world-val-pal.json" if task == "segmentation" else f"{task}-world-val.json"
            result = json.loads((run / "eval" / name).read_text())
            values = [v for k, v in result.items() if isinstance(v, float) and k != "config"]
            assert values and all(0.0 <= v <= 1.0 for v in values), (run.name, task)
    assert (chosen / "eval" / "diagnostics-world-val.json").exists()
    # the claims step: grounding for every method, collapse, the pooled control, unseen classes, falsification
    for run in evaluated:
        assert json.loads((run / "eval" / "grounding-world-val.json").read_text())["phrases"] > 0
    assert all((chosen / "eval" / f"{t}-world-val.json").exists() for t in ("collapse", "claims"))
    assert (out / "runs" / "pal-pooled" / "eval" / "grounding-world-val.json").exists()
    unseen = json.loads((out / "runs" / "unseen-pal" / "eval" / "classification-world-val.json").read_text())
    assert set(unseen["unseen_names"]) <= {"moon", "cup", "key"} and 0 <= unseen["unseen_acc"] <= 1
    assert "## Claims of the PAL paper" in (out / "report.md").read_text()
    assert list((chosen / "eval" / "figures").glob("segmentation-*.png"))
    selection = json.loads((out / "selection.json").read_text())  # one pick per method, on held-out train pairs
    assert len(rows) == len(selection) and {r["method"] for r in rows} == set(selection)
    assert selection["pal"]["params"]["anchors"] == ablation["chosen"]
    for pick in selection.values():
        assert pick.get("tried") is None or pick["heldout_mean_r1"] == max(t[1] for t in pick["tried"])
    background = json.loads((out / "background.json").read_text())  # picked on train, shown on val
    assert background["picked_on"].startswith("world train") and (out / "background.png").exists()
    for rule, picked in background["rules"].items():
        t = picked["picked"]
        assert [g[rule] for g in picked["val"]["grid"]] == ([None] if t is None else [None, t])
        assert picked["val"]["grid"][0]["fg_mIoU"] == background["val_fg_mIoU"]
    assert len(list((out / "world" / "val2017").glob("*.jpg"))) == 16
    fashion = out / "fashion_mnist.json"
    if Path("/usr/share/datasets/fashion-mnist").is_dir():  # Debian's dataset-fashion-mnist: the transfer check ran
        rows = json.loads(fashion.read_text())
        assert rows[0]["method"].startswith("pal")
        assert all(0 <= r[k] <= 1 for r in rows for k in ("seen_acc", "unseen_acc"))
    # a second run reuses everything: no store, run or evaluation is redone
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert main(args) == 0
    # rewritten from the kept results on every run
    summaries = ("report", "k_ablation", "fashion_mnist", "selection", "background")
    kept = {p: t for p, t in stamps.items() if not p.name.startswith(summaries)}
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())


def test_a_stale_demo_run_says_to_remove_the_demo_folder(tmp_path, world_features):
    """After an upgrade that changes a method's settings, the demo's old run dir is refused with what to do."""
    import pytest

    from pipe_align.align.loop import RunConfig
    from pipe_align.extract.errors import PipeError
    from pipe_align.pipelines.demo import DemoConfig, Stages

    stages = Stages(DemoConfig(out=str(tmp_path / "demo"), progress=False), world_features)
    shards, out = world_features / "world" / "train", tmp_path / "demo" / "runs" / "cca"
    stages.align("cca", shards, out, RunConfig(val_fraction=0.25), {})
    assert stages.align("cca", shards, out, RunConfig(val_fraction=0.25), {}).path == out  # reused as it is
    with pytest.raises(PipeError, match=f"remove {tmp_path / 'demo'}"):
        stages.align("cca", shards, out, RunConfig(val_fraction=0.25), {"reg": 0.5})
