"""`pipe demo --size small` end to end with tiny random encoders: every stage writes its outputs, metrics in range."""

import csv
import json
from pathlib import Path

from pipelines.cli import main


def test_demo_small_end_to_end(tmp_path, tiny_dinov2, tiny_bert):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--size", "small", "--image-encoder", f"hf:{tiny_dinov2}",
            "--text-encoder", f"hf:{tiny_bert}", "--pal-epochs", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    feats = out / "features" / "world"
    for split in ("train", "val"):
        stores = sorted(p.name for p in (feats / split).glob("*.zarr"))
        assert len(stores) == (3 if split == "val" else 2), stores
    ablation = json.loads((out / "k_ablation.json").read_text())
    assert [a["K"] for a in ablation["grid"]] == [16, 64, 256, 512] and (out / "k_ablation.png").exists()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert {f"pal-k{k}" for k in (16, 64, 256, 512)} <= set(runs)
    chosen = out / "runs" / f"pal-k{ablation['chosen']}"
    for task in ("classification", "retrieval", "segmentation"):
        for run in (out / "runs").iterdir():
            name = f"{task}-world-val-pal.json" if task == "segmentation" else f"{task}-world-val.json"
            result = json.loads((run / "eval" / name).read_text())
            values = [v for k, v in result.items() if isinstance(v, float) and k != "config"]
            assert values and all(0.0 <= v <= 1.0 for v in values), (run.name, task)
    assert (chosen / "eval" / "diagnostics-world-val.json").exists()
    assert list((chosen / "eval" / "figures").glob("segmentation-*.png"))
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} >= {"pal"} and len(rows) == len(runs) - 3  # the chosen PAL + each baseline
    fashion = out / "fashion_mnist.json"
    if Path("/usr/share/datasets/fashion-mnist").is_dir():  # Debian's dataset-fashion-mnist: the transfer check ran
        rows = json.loads(fashion.read_text())
        assert rows[0]["method"] == "pal" and all(0 <= r[k] <= 1 for r in rows for k in ("seen_acc", "unseen_acc"))
    # a second run reuses everything: no store, run or evaluation is redone
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert main(args) == 0
    summaries = ("report", "k_ablation", "fashion_mnist")  # rewritten from the kept results on every run
    kept = {p: t for p, t in stamps.items() if not p.name.startswith(summaries)}
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
