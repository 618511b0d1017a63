"""Evaluation cost: `pipe eval segmentation` at VOC-val scale and retrieval metrics at COCO-5k scale, on this CPU.

    python bench/eval.py [--images 1449] [--reps 3] [--threads 1] [--scale 2] [--probe 100] [--mask-size 224]
                         [--skip-seg] [--skip-retrieval]

Segmentation: a temp folder gets an image store of world/val with --images rows in DINOv2-S's shapes at 224 px
(16x16 = 256 patches x 384, float16, resize "squash", the layout `pipe extract` picks, ids = the world ids so the
masks match), a class-prompt store in MiniLM's shapes (13 classes x 4 templates, 64 tokens x 384) and a PAL run dir
(K = 512 random anchors). Features and anchors are random: the cost of an eval does not depend on the values (the
metrics printed by the eval are meaningless). `pipe eval segmentation --protocol pal --no-figures` then runs end to
end through `pipelines.cli.main`, once per rep, each in a fresh subprocess whose RSS high-water mark (VmHWM of
/proc/self/status, which exec resets; ru_maxrss would carry the parent's peak over) belongs to that eval alone, and
is also read after the imports so the eval's own share shows; wall time is that of `main()` (imports excluded,
everything else included: opening stores, loading the aligner, drawing the world's scenes and masks). The stores are
written by a subprocess too, so this process stays small.
Drawing the 1,449 world masks alone is timed the same way, so the reader sees how much of the eval is data
generation (VOC masks are read from PNGs instead; they are also larger: about 500x375 against the world's 224x224,
so upsampling costs more per image there; --mask-size draws larger world masks). One more eval on a store --scale
times larger shows that peak memory is one read block's working set, flat in the number of images.

Retrieval: 5,000 images x 25,000 captions of random 512-d embeddings, timed with `bench/eval_metrics.py`'s worker
(each method in its own subprocess, median of --reps): `evaluate.metrics.retrieval_metrics` (blocked float32)
against a naive dense float64 computation (the whole similarity matrix, then top-k both ways).

Threads: every worker runs with --threads torch (OpenMP) threads, 1 by default (0 = torch's default, one per core).
On a shared, oversubscribed machine torch's default is pathological for the segmentation eval: its many small
per-image ops (upsampling, argmax, confusion-matrix counting over ~50k pixels) each wait at an OpenMP barrier for a
thread that another job has descheduled. --probe N times one eval of N images both ways so the reader sees the size
of that effect on the machine at hand. On a shared machine compare ratios and medians within one run; the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

ROOT = Path(HERE).parent
D, GRID, TEXT_LEN, ANCHORS, TEMPLATES = 384, (16, 16), 64, 512, 4
IMAGE_ENC = {
    "alias": "dinov2-small",
    "model_id": "facebook/dinov2-small",
    "revision": None,
    "weights": "random (bench)",
    "modality": "image",
    "dim": D,
    "layer": "last",
    "image_size": 224,
    "patch_size": 14,
    "num_register_tokens": 0,
    "pooling": None,
    "max_length": None,
}
TEXT_ENC = {
    "alias": "minilm",
    "model_id": "sentence-transformers/all-MiniLM-L6-v2",
    "revision": None,
    "weights": "random (bench)",
    "modality": "text",
    "dim": D,
    "layer": "last",
    "image_size": None,
    "patch_size": None,
    "num_register_tokens": 0,
    "pooling": "mean",
    "max_length": TEXT_LEN,
}
MiB = 1 << 20


def maxrss_bytes() -> int:
    """This process's RSS high-water mark. VmHWM belongs to the address space, which exec replaces; ru_maxrss is
    carried over from the parent through fork + exec (so a child would report a large parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def world_options(images: int, mask_size: int) -> dict[str, int]:
    return {"size": images} | ({"image_size": mask_size} if mask_size != 224 else {})


# -- building the inputs ----------------------------------------------------------------------------------------------


def write_store(path: Path, layout, arrays_for_shard, rng) -> None:
    from pipe_align.extract.store import create_store

    st = create_store(path, layout)
    for s in range(layout.num_shards):
        a, b = layout.shard_range(s)
        st.write_shard(s, arrays_for_shard(a, b, rng), np.zeros(b - a, bool))
    st.finalize()


def build(base: Path, images: int, mask_size: int) -> dict:
    """Image store, class-prompt store and PAL run dir under `base`; returns paths and sizes."""
    from pipe_align.align.pal import PAL, PALConfig
    from pipe_align.extract.datasets import get_dataset
    from pipe_align.extract.datasets.base import CLIP_TEMPLATES
    from pipe_align.extract.store import StoreLayout, default_rows, store_path

    ds = get_dataset("world", None, "val", **world_options(images, mask_size))
    recs = ds.images()
    ids = np.array([r.id for r in recs])
    labels = np.array([r.label for r in recs], np.int32)
    classes = tuple(ds.classes)
    features, run = base / "features", base / "run"
    rng = np.random.default_rng(0)

    n, p = len(ids), GRID[0] * GRID[1]
    chunk, shard = default_rows(p, D, n)
    lay = StoreLayout(
        modality="image",
        encoder=IMAGE_ENC,
        dataset="world",
        split="val",
        count=n,
        tokens=p,
        dim=D,
        rows_per_chunk=chunk,
        rows_per_shard=shard,
        dtype="float16",
        grid=GRID,
        resize="squash",
        classes=classes,
    )

    def image_shard(a: int, b: int, rng) -> dict:
        patches = np.empty((b - a, p, D), np.float16)
        for r in range(0, b - a, 32):  # float32 normals a few rows at a time, stored as float16
            patches[r : r + 32] = rng.standard_normal((min(32, b - a - r), p, D), np.float32)
        return {
            "ids": ids[a:b],
            "cls": rng.standard_normal((b - a, D), np.float32).astype(np.float16),
            "patches": patches,
            "labels": labels[a:b],
        }

    image_path = store_path(features, "world", "val", IMAGE_ENC["alias"])
    write_store(image_path, lay, image_shard, rng)

    templates = tuple(CLIP_TEMPLATES[:TEMPLATES])
    item = np.repeat(np.arange(len(classes)), len(templates))
    m = len(item)
    tchunk, tshard = default_rows(TEXT_LEN, D, m)
    tlay = StoreLayout(
        modality="text",
        encoder=TEXT_ENC,
        dataset="world",
        split="val",
        count=m,
        tokens=TEXT_LEN,
        dim=D,
        rows_per_chunk=tchunk,
        rows_per_shard=tshard,
        dtype="float16",
        classes=classes,
        templates=templates,
    )

    def prompt_shard(a: int, b: int, rng) -> dict:
        sl = slice(a, b)
        return {
            "ids": np.array([f"{c}:{j % len(templates)}" for j, c in enumerate(item)])[sl],
            "text": np.array([templates[j % len(templates)].format(classes[c]) for j, c in enumerate(item)])[sl],
            "item": item[sl],
            "tokens": rng.standard_normal((b - a, TEXT_LEN, D), np.float32).astype(np.float16),
            "length": rng.integers(6, 14, b - a).astype(np.int16),
            "pooled": rng.standard_normal((b - a, D), np.float32).astype(np.float16),
        }

    text_path = store_path(features, "world", "val", TEXT_ENC["alias"])
    write_store(text_path.with_name(text_path.name.replace(".zarr", ".prompts.zarr")), tlay, prompt_shard, rng)

    PAL(PALConfig(anchors=ANCHORS), D, D).save(run)
    meta = {
        "method": "pal",
        "image_encoder": IMAGE_ENC["alias"],
        "text_encoder": TEXT_ENC["alias"],
        "dataset": "world",
        "split": "train",
        "tokens": {"image": "patches"},
    }
    (run / "run.json").write_text(json.dumps(meta))
    disk = sum(f.stat().st_size for f in image_path.rglob("*") if f.is_file())
    from pipe_align.evaluate.loading import row_blocks
    from pipe_align.extract.store import open_store

    blocks = list(row_blocks(open_store(image_path)))
    return {
        "features": str(features),
        "run": str(run),
        "rows": n,
        "disk": disk,
        "raw16": n * p * D * 2,
        "chunk": chunk,
        "shard": shard,
        "blocks": len(blocks),
        "block_rows": max(e - s for s, e in blocks),
    }


# -- workers (each in a fresh process) --------------------------------------------------------------------------------


def seg_worker(args: argparse.Namespace) -> dict:
    importlib.import_module("pipe_align.pipelines")  # first, as in `pipe`: its thread policy precedes torch
    import torch  # noqa: F401 - imported before the baseline RSS, as are the eval modules

    import pipe_align.evaluate.segmentation  # noqa: F401
    import pipe_align.evaluate.tasks  # noqa: F401
    from pipe_align.pipelines.cli import main

    opts = [x for k, v in world_options(args.images, args.mask_size).items() for x in ("-o", f"{k}={v}")]
    argv = [
        "eval",
        "segmentation",
        "--dataset",
        "world",
        "--split",
        "val",
        "--features",
        args.features,
        "--run",
        args.run,
        "--protocol",
        "pal",
        "--device",
        "cpu",
        "--no-figures",
        *opts,
    ]
    rss0 = maxrss_bytes()
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"pipe {' '.join(argv)} exited with {rc}")
    res = json.loads((Path(args.run) / "eval" / "segmentation-world-val-pal.json").read_text())
    return {
        "seconds": seconds,
        "rss0": rss0,
        "rss": maxrss_bytes(),
        "images": res["images"],
        "pixels": res["pixels"],
        "threads": torch.get_num_threads(),
    }


def masks_worker(args: argparse.Namespace) -> dict:
    from pipe_align.extract.datasets import get_dataset

    rss0 = maxrss_bytes()
    t0 = time.perf_counter()
    ds = get_dataset("world", None, "val", **world_options(args.images, args.mask_size))
    n = len(ds.images())  # the eval does this too (matching store ids to dataset rows): it draws every scene
    t1 = time.perf_counter()
    pixels = sum(int(ds.load_mask(i).size) for i in range(n))
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "scenes_seconds": t1 - t0, "rss0": rss0, "rss": maxrss_bytes(), "pixels": pixels}


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a worker: torch (OpenMP) threads fixed to `threads`, or torch's own default when 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return env | ({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads > 0 else {})


def in_subprocess(kind: str, args: argparse.Namespace, extra: list[str], images: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--images",
        str(images),
        "--mask-size",
        str(args.mask_size),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=thread_env(threads))
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the two benchmarks -----------------------------------------------------------------------------------------------


def build_in_subprocess(args: argparse.Namespace, base: Path, images: int) -> dict:
    return in_subprocess("build", args, ["--base", str(base)], images, args.threads)


def bench_segmentation(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="pipe-bench-eval-"))
    try:
        t0 = time.perf_counter()
        b = build_in_subprocess(args, base, args.images)
        built = time.perf_counter() - t0
        block_rows = b["block_rows"]
        print(
            f"segmentation: world/val, {b['rows']} images, masks {args.mask_size}x{args.mask_size}; image store "
            f"DINOv2-S shapes (grid {GRID[0]}x{GRID[1]} = {GRID[0] * GRID[1]} patches x {D}, float16, squash), "
            f"prompts 13 classes x {TEMPLATES} templates x {TEXT_LEN} tokens, PAL K={ANCHORS}"
        )
        print(
            f"  features are RANDOM (the eval's cost does not depend on their values; its metrics mean nothing). "
            f"Inputs written in {built:.1f} s"
        )
        print(
            f"  image store: {b['raw16'] / MiB:.0f} MiB of float16 patches ({2 * b['raw16'] / MiB:.0f} MiB as "
            f"float32), {b['disk'] / MiB:.0f} MiB on disk (zstd); chunk {b['chunk']} rows, shard {b['shard']} rows, "
            f"eval read block {block_rows} rows ({block_rows * GRID[0] * GRID[1] * D * 4 / MiB:.0f} MiB float32), "
            f"{b['blocks']} blocks"
        )
        extra = ["--features", str(b["features"]), "--run", str(b["run"])]
        seg, masks = [], []
        for _ in range(args.reps):  # interleaved, so that a load spike hits both alike
            seg.append(in_subprocess("seg", args, extra, args.images, args.threads))
            masks.append(in_subprocess("masks", args, [], args.images, args.threads))
        ts = [r["seconds"] for r in seg]
        tm = [r["seconds"] for r in masks]
        t_seg, t_mask = statistics.median(ts), statistics.median(tm)
        n = seg[0]["images"]
        rss = statistics.median(r["rss"] for r in seg)
        rss0 = statistics.median(r["rss0"] for r in seg)
        m_rss = statistics.median(r["rss"] - r["rss0"] for r in masks)
        print(
            f"  pipe eval segmentation --protocol pal --no-figures (torch {seg[0]['threads']} threads), "
            f"median of {args.reps}: {t_seg:.2f} s (runs {', '.join(f'{t:.2f}' for t in ts)}) "
            f"-> {n / t_seg:.1f} images/s, {seg[0]['pixels'] / 1e6:.1f} M pixels scored"
        )
        print(
            f"  drawing the {n} world scenes + masks alone: {t_mask:.2f} s (runs "
            f"{', '.join(f'{t:.2f}' for t in tm)}; scenes {statistics.median(r['scenes_seconds'] for r in masks):.2f}"
            f" s of it), peak +{m_rss / MiB:.0f} MiB = {t_mask / t_seg:.0%} of the eval's time"
        )
        rest = t_seg - t_mask
        if rest > 0:
            print(
                f"  eval without data generation (difference of medians, an estimate): {rest:.2f} s -> "
                f"{n / rest:.1f} images/s"
            )
        above = rss - rss0
        runs = ", ".join(f"{r['rss'] / MiB:.0f}" for r in seg)
        print(
            f"  peak RSS {rss / MiB:.0f} MiB (median; runs {runs}); "
            f"after imports {rss0 / MiB:.0f} MiB, so the eval itself adds {above / MiB:.0f} MiB = "
            f"{above / b['raw16']:.2f}x the store's float16 patches ({above / (2 * b['raw16']):.2f}x as float32), "
            f"{above / b['disk']:.2f}x its size on disk"
        )
        if args.scale > 1:
            shutil.rmtree(base / "features", ignore_errors=True)  # disk: the larger store replaces this one
            scale_check(args, base / "scale", above, b["raw16"])
        if args.probe > 0 and args.threads != 0:
            probe_default_threads(args, base / "probe")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def scale_check(args: argparse.Namespace, base: Path, above: float, raw16: int) -> None:
    """One eval of a store --scale times larger: its peak memory should not grow with it (blocked reading)."""
    n = args.images * args.scale
    b = build_in_subprocess(args, base, n)
    r = in_subprocess("seg", args, ["--features", b["features"], "--run", b["run"]], n, args.threads)
    big = r["rss"] - r["rss0"]
    verdict = "flat: bounded by a read block, not the store" if big < 1.25 * above else "GREW with the store"
    print(
        f"  scale check, {r['images']} images ({b['raw16'] / MiB:.0f} MiB float16 patches, "
        f"x{b['raw16'] / raw16:.1f}), one run: {r['seconds']:.2f} s ({r['images'] / r['seconds']:.1f} images/s); "
        f"the eval adds {big / MiB:.0f} MiB, x{big / above:.2f} of the {args.images}-image figure ({verdict})"
    )
    shutil.rmtree(base, ignore_errors=True)


def probe_default_threads(args: argparse.Namespace, base: Path) -> None:
    """One eval of the first --probe images with torch's default thread count against --threads, same inputs."""
    b = build_in_subprocess(args, base, args.probe)
    extra = ["--features", str(b["features"]), "--run", str(b["run"])]
    default = in_subprocess("seg", args, extra, args.probe, 0)
    fixed = in_subprocess("seg", args, extra, args.probe, args.threads)
    n = default["images"]
    print(
        f"  probe, {n} images, one run each: torch default {default['threads']} threads {default['seconds']:.2f} s "
        f"({n / default['seconds']:.1f} images/s) vs {fixed['threads']} thread(s) {fixed['seconds']:.2f} s "
        f"({n / fixed['seconds']:.1f} images/s): x{default['seconds'] / fixed['seconds']:.1f} time with the default; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def bench_retrieval(args: argparse.Namespace) -> None:
    """Reuses bench/eval_metrics.py: its worker runs one method --repeats times in a fresh process."""
    script = os.path.join(HERE, "eval_metrics.py")  # run, not imported: this process stays small (see main)
    images, per, dim = 5000, 5, 512
    print(
        f"retrieval: {images} images x {images * per} captions, random {dim}-d (captions = image + noise, "
        f"bench/eval_metrics.py make_data), ks 1, 5, 10, median of {args.reps}, each method in a fresh process"
    )
    res = {}
    for method in ("blocked", "dense64"):
        cmd = [
            sys.executable,
            script,
            "--worker",
            method,
            "--images",
            str(images),
            "--per-image",
            str(per),
            "--dim",
            str(dim),
            "--repeats",
            str(args.reps),
            "--block",
            "1024",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=thread_env(args.threads))
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["median"] = statistics.median(r["times"])
        r["above"] = (r["rss_peak_kib"] - r["rss_setup_kib"]) * 1024
        res[method] = r
        name = {"blocked": "retrieval_metrics (blocked float32)", "dense64": "naive dense float64 + topk"}[method]
        print(
            f"  {name:>36}: {r['median']:7.3f} s (runs {', '.join(f'{t:.3f}' for t in r['times'])}), peak RSS "
            f"{r['rss_peak_kib'] / 1024:6.0f} MiB, {r['above'] / MiB:6.0f} MiB above the data"
        )
    bl, de = res["blocked"], res["dense64"]
    diff = max(abs(de["metrics"][k] - v) for k, v in bl["metrics"].items())
    print(
        f"  naive / blocked: time x{de['median'] / bl['median']:.2f}, peak RSS "
        f"x{de['rss_peak_kib'] / bl['rss_peak_kib']:.2f}, above the data x{de['above'] / max(bl['above'], 1):.1f}; "
        f"max |recall difference| {diff:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1449, help="segmentation images (VOC val has 1,449)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mask-size", type=int, default=224, help="world image and mask side in px (VOC: ~500x375)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every worker; 0 = torch's default")
    ap.add_argument(
        "--probe",
        type=int,
        default=100,
        help="also time one eval of this many images at torch's default threads (0 = off)",
    )
    ap.add_argument(
        "--scale",
        type=int,
        default=2,
        help="also run one eval on a store this many times larger: does memory stay flat? (<2 = off)",
    )
    ap.add_argument("--skip-seg", action="store_true")
    ap.add_argument("--skip-retrieval", action="store_true")
    ap.add_argument("--worker", choices=("build", "seg", "masks"), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--features", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker == "build":
            out = build(Path(args.base), args.images, args.mask_size)
        else:
            out = seg_worker(args) if args.worker == "seg" else masks_worker(args)
        print(json.dumps(out))
        return
    # This process imports nothing heavy and holds no data: a child's ru_maxrss starts from its parent's peak.
    t0 = time.perf_counter()
    threads = args.threads or "torch's default"
    print(
        f"bench/eval.py: {os.cpu_count()} CPUs, torch {importlib.metadata.version('torch')}, workers run with "
        f"{threads} thread(s); load average {os.getloadavg()[0]:.2f}"
    )
    if not args.skip_seg:
        bench_segmentation(args)
    if not args.skip_retrieval:
        bench_retrieval(args)
    print(f"load average after: {os.getloadavg()[0]:.2f}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
