"""The Python API (`pipe_align.pipelines.load`) and `pipe segment|classify|search`, with the tiny random encoders.

The consistency tests compare the API, which runs the encoders on images and texts, with `pipe eval`'s own code on
the stores those encoders wrote for the same world val split: embeddings, class weights and segmentation predictions
must agree (the API rounds features to the stores' float16, so they agree exactly here; the tolerance allows fp16
storage error). One slow test does the same with the offline DINOv2-S + MiniLM.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipe_align.align.loop import RunConfig
from pipe_align.align.methods import method_names
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.evaluate.background import decode, scan
from pipe_align.evaluate.config import EvalConfig
from pipe_align.evaluate.context import load_context
from pipe_align.evaluate.loading import embed_images, embed_texts
from pipe_align.evaluate.prompts import class_weights
from pipe_align.evaluate.segmentation import EXTRACT_OPTIONS, run_segmentation, upsample_argmax
from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.pipelines import api
from pipe_align.pipelines.cli import main
from tests.helpers import one_line_error

VAL = 8  # world val images in the world_features fixture
EMB_TOL = 1e-3  # fp16 storage error of features of norm ~1, after the methods' normalisation


def train(features: Path, out: Path, method: str, **params) -> Path:
    run = RunConfig(epochs=2, batch_size=8, val_fraction=0.25)
    cfg = AlignConfig(
        shards=str(features / "world" / "train"),
        out=str(out),
        method=method,
        run=run,
        params=tuple(sorted(params.items())),
    )
    return run_align(cfg, progress=False).path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_features):
    """One run per registered method on the tiny world train stores (PAL with K=16)."""
    out = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    small = {"anchors": 16}  # PAL and its fixed-anchor variant: the world has fewer training pairs than 512
    made = {m: train(world_features, out / m, m, **(small if m.startswith("pal") else {})) for m in method_names()}
    torch.set_num_threads(threads)
    return made


def val_images() -> list[Image.Image]:
    world = get_dataset("world", None, "val", size=VAL)
    return [world.load_image(i) for i in range(VAL)]


def eval_cfg(features: Path, run: Path, task: str = "segmentation") -> EvalConfig:
    return EvalConfig(
        task=task,
        dataset="world",
        split="val",
        features=str(features),
        run=str(run),
        device="cpu",
        protocol="pal" if task == "segmentation" else None,
        options=(("size", VAL),),
        examples=VAL,
    )


# -- consistency with `pipe eval` -----------------------------------------------------------------------------------
def test_load_is_exported_and_rebuilds_the_extraction_features(runs, world_features, one_thread):
    from pipe_align.pipelines import load

    assert load is api.load
    model = load(runs["pal"], device="cpu")
    ctx = load_context(eval_cfg(world_features, runs["pal"]), "prompts", EXTRACT_OPTIONS)
    rows = model.image_features(val_images())
    assert model.resize == ctx.image.layout.resize == "squash"
    assert torch.equal(rows.patches, ctx.image.rows("patches").float())  # same code path, same fp16 rounding
    assert torch.equal(rows.cls, ctx.image.rows("cls").float())
    prompts = [str(t) for t in ctx.text["text"][:]]
    txt = model.text_features(prompts)
    n = int(txt.length.max())
    assert torch.equal(txt.length, torch.from_numpy(ctx.text["length"][:].astype(np.int64)))
    # other batches pad to other lengths, which moves float32 results by rounding: within one fp16 step
    assert torch.allclose(txt.tokens[:, :n], ctx.text.rows("tokens")[:, :n].float(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("method", method_names())
def test_api_equals_eval_from_stores(runs, world_features, method, one_thread):
    """Image and caption embeddings, class weights and the segmentation of every val image, for every method."""
    model = api.load(runs[method], device="cpu")
    seg_ctx = load_context(eval_cfg(world_features, runs[method]), "prompts", EXTRACT_OPTIONS)
    cap_ctx = load_context(eval_cfg(world_features, runs[method], "retrieval"), "captions")
    images = val_images()
    img = model.encode_image(images)
    assert img.shape == (VAL, img.shape[1]) and torch.allclose(img.norm(dim=1), torch.ones(VAL), atol=1e-4)
    assert torch.allclose(img, embed_images(seg_ctx.aligner, seg_ctx.image, "cpu"), atol=EMB_TOL)
    captions = [str(t) for t in cap_ctx.text["text"][:]]
    assert torch.allclose(model.encode_text(captions), embed_texts(cap_ctx.aligner, cap_ctx.text, "cpu"), atol=EMB_TOL)
    weights, classes = class_weights(seg_ctx)
    assert torch.allclose(model.classifier(classes), weights, atol=EMB_TOL)

    _, extras = run_segmentation(seg_ctx)
    assert len(extras["examples"]) == VAL
    for _, item, mask, pred in extras["examples"]:
        seg = model.segment(images[item], classes[1:], background="background")
        assert seg.names == classes and seg.background == 0 and seg.labels.shape == mask.shape
        if method == "pal-fixed":  # untrained anchors: two classes tie within 1e-4 at a few upsampled pixels, where
            # the two paths' summation orders may pick either (measured: 4 of 50,176 pixels in one image)
            assert (seg.labels.numpy() != pred).mean() < 1e-3, f"{method}: image {item}"
            continue
        assert np.array_equal(seg.labels.numpy(), pred), f"{method}: image {item}"


def test_inputs_paths_tensors_and_the_derived_scores(runs, tmp_path, one_thread):
    model = api.load(runs["pal"], device="cpu", batch_size=3)
    images = val_images()[:4]
    ref = model.encode_image(images)
    path = tmp_path / "x.png"
    images[1].save(path)  # lossless
    u8 = torch.from_numpy(np.array(images[2])).permute(2, 0, 1)
    assert torch.equal(model.encode_image([images[0], path, u8, u8.float() / 255]), torch.cat([ref[:3], ref[2:3]]))
    assert torch.equal(model.encode_image(torch.stack([u8, u8])), ref[[2, 2]])
    texts = ["a red ball", "a tree above a house"]
    assert torch.allclose(model.similarity(images, texts), ref @ model.encode_text(texts).T)
    labels = ["ball", "tree", "car"]
    assert torch.allclose(model.classify(images, labels), ref @ model.classifier(labels).T)
    weights = model.classifier(labels)  # the words reach the encoder (tiny BERT knows them: no [UNK] prompts)
    assert (torch.cdist(weights, weights) + torch.eye(3)).min() > 1e-3
    with pytest.raises(PipeError, match=r"\[0, 1\]"):
        model.encode_image(u8.float())  # 0-255 floats: not an image in [0, 1]
    with pytest.raises(PipeError, match="unreadable image"):
        model.encode_image(tmp_path / "missing.jpg")
    with pytest.raises(PipeError, match="labels"):
        model.classify(images, [])
    with pytest.raises(PipeError, match="given twice"):
        model.segment(images[0], ["ball", "ball"])
    with pytest.raises(PipeError, match="text 1 is empty"):
        model.encode_text(["a ball", "  "])


def test_segmentation_score_maps_and_sizes(runs, one_thread):
    model = api.load(runs["pal"], device="cpu")
    image = val_images()[0].resize((150, 90))  # not square: the label map has the image's size
    seg = model.segment(image, ["ball", "star"], background=None)
    assert seg.names == ["ball", "star"] and seg.background is None and seg.size == (90, 150)
    maps = torch.stack([seg.score_map("ball"), seg.score_map(1)])
    assert maps.shape == (2, 90, 150)
    assert torch.equal(seg.labels, maps.argmax(0))  # the label is the best of the upsampled score maps


def test_pal_anchor_maps(runs, one_thread):
    model = api.load(runs["pal"], device="cpu")
    image = val_images()[3]
    maps = model.anchor_maps(image, top=3)
    profile = model.encode_image(image)[0]  # world stores are squashed, as the anchor maps are
    assert maps.values == sorted(maps.values, reverse=True) and maps.values[0] == pytest.approx(profile.max().item())
    assert [profile[k].item() for k in maps.anchors] == pytest.approx(maps.values)
    patches = model.image_features(image, resize="squash").patches[0]
    anchors = model.aligner.image_anchors
    for k, m in zip(maps.anchors, maps.maps):  # the cosine of every patch with the anchor, on the grid
        expect = F.cosine_similarity(patches, anchors[k][None], dim=1).reshape(model.image_encoder.grid)
        assert torch.allclose(m, expect, atol=1e-5)
    with pytest.raises(PipeError, match="no anchors"):
        api.load(runs["procrustes"], device="cpu").anchor_maps(image)


# -- background ------------------------------------------------------------------------------------------------------
def test_background_rules():
    """Scores on a 1x2 grid upsampled to 1x2 (identity): class 0 is background. Pixel 0: background 0.1, best other
    0.3 (class 1); pixel 1: background 0.2, best other 0.6 (class 2). Background wins the argmax nowhere."""
    scores = torch.tensor([[[0.1, 0.2]], [[0.3, 0.1]], [[0.2, 0.6]]])
    assert decode(scores, (1, 2)).tolist() == [[1, 2]]
    assert torch.equal(decode(scores, (1, 2)), upsample_argmax(scores, (1, 2)))
    assert decode(scores, (1, 2), background=0, threshold=0.5).tolist() == [[0, 2]]
    assert decode(scores, (1, 2), background=0, threshold=0.7).tolist() == [[0, 0]]
    assert decode(scores, (1, 2), background=0, threshold=0.2).tolist() == [[1, 2]]
    assert decode(scores, (1, 2), background=0, bias=0.25).tolist() == [[0, 2]]  # 0.3 < 0.1 + 0.25; 0.6 > 0.45
    assert decode(scores, (1, 2), background=0, bias=0.5).tolist() == [[0, 0]]
    assert decode(scores, (1, 2), background=0, bias=0.15).tolist() == [[1, 2]]
    assert decode(scores, (1, 2), background=0, bias=0.25, threshold=0.7).tolist() == [[0, 0]]


@pytest.mark.parametrize("rule", ["threshold", "bias"])
def test_background_scan_against_the_eval(runs, world_features, rule, one_thread):
    cfg = eval_cfg(world_features, runs["pal"])
    evaluated, _ = run_segmentation(load_context(cfg, "prompts", EXTRACT_OPTIONS))
    found = scan(cfg, rule)
    assert found.values[0] is None and len(found.values) == 20 and found.images == VAL
    assert found.values[1:] == sorted(found.values[1:])
    assert found.fg_miou[0] == pytest.approx(evaluated["fg_mIoU"]) and found.miou[0] == pytest.approx(evaluated["mIoU"])
    assert found.best == found.values[int(np.argmax(found.fg_miou))]
    everything_bg = scan(cfg, rule, [None, math.inf])
    assert everything_bg.fg_miou[1] == 0.0  # every object pixel called background
    assert all((preds[1] == 0).all() for _, _, preds in everything_bg.examples)
    model = api.load(runs["pal"], device="cpu")  # the API applies the scan's rule
    value = found.values[-1]  # the 95% quantile: most patches the eval gives an object become background
    item, _, preds = max(scan(cfg, rule, [None, value]).examples, key=lambda e: (e[2][0] > 0).sum())
    assert (preds[0] > 0).sum() > (preds[1] > 0).sum()
    seg = model.segment(val_images()[item], found.classes[1:], **{rule: value})
    assert np.array_equal(seg.labels.numpy(), preds[1])


# -- the commands ----------------------------------------------------------------------------------------------------
@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(val_images()[:5]):
        img.save(folder / ("sub" if i == 4 else "") / f"img{i}.png")
    return folder


def test_segment_command(runs, image_dir, tmp_path, one_thread):
    out = tmp_path / "seg"
    paths = [image_dir / "img0.png", image_dir / "sub" / "img4.png"]
    assert (
        main(
            [
                "segment",
                *map(str, paths),
                "--run",
                str(runs["pal"]),
                "--labels",
                "ball, star,tree",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "labels.txt").read_text().splitlines() == ["0\tbackground", "1\tball", "2\tstar", "3\ttree"]
    model = api.load(runs["pal"], device="cpu")
    for p in paths:
        with Image.open(out / f"{p.stem}.labels.png") as png:
            assert png.mode == "P"
            written = np.asarray(png)
        assert np.array_equal(written, model.segment(p, ["ball", "star", "tree"]).labels.numpy())
        with Image.open(out / f"{p.stem}.overlay.png") as png:
            assert png.width > 2 * 224 * 0.8  # image and overlay side by side
    for rule in ("--background-threshold", "--background-bias"):  # other labels: another --out (labels.txt)
        out = tmp_path / f"seg{rule}"
        assert (
            main(
                [
                    "segment",
                    str(paths[0]),
                    "--run",
                    str(runs["pal"]),
                    "--labels",
                    "ball",
                    "--out",
                    str(out),
                    rule,
                    "1e9",
                    "--no-progress",
                ]
            )
            == 0
        )
        with Image.open(out / "img0.labels.png") as png:
            assert not np.asarray(png).any()  # every pixel background under an unreachable threshold or bias


def test_classify_command(runs, image_dir, tmp_path, one_thread):
    out = tmp_path / "c.csv"
    (image_dir / "broken.jpg").write_bytes(b"not a jpeg")
    labels = ["ball", "star", "tree", "house"]
    assert (
        main(
            [
                "classify",
                str(image_dir),
                "--run",
                str(runs["pal"]),
                "--labels",
                ",".join(labels),
                "--top-k",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png"]
    scores = api.load(runs["pal"], device="cpu").classify([Path(r["path"]) for r in rows], labels)
    for r, s in zip(rows, scores):
        best = s.topk(2)
        assert [r["label_1"], r["label_2"]] == [labels[i] for i in best.indices]
        assert [float(r["score_1"]), float(r["score_2"])] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert (
        main(
            [
                "classify",
                str(image_dir),
                "--run",
                str(runs["pal"]),
                "--labels",
                "ball",
                "--out",
                str(out),
                "--strict",
                "--no-progress",
            ]
        )
        == 2
    )


def test_search_command_and_its_cache(runs, image_dir, capsys, one_thread):
    args = [
        "search",
        str(image_dir),
        "--run",
        str(runs["pal"]),
        "--query",
        "a red ball",
        "--top-k",
        "3",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == "a red ball" and len(lines) == 4
    model = api.load(runs["pal"], device="cpu")
    paths = sorted(image_dir.rglob("*.png"))
    best = (model.encode_text("a red ball") @ model.encode_image(paths).T)[0].topk(3)
    assert [line.split()[-1] for line in lines[1:]] == [str(paths[i]) for i in best.indices]
    assert "5 encoded now, 0 from the cache" in out.err
    assert main(args) == 0
    assert "0 encoded now, 5 from the cache" in capsys.readouterr().err
    (image_dir / "img1.png").unlink()
    val_images()[6].save(image_dir / "img0.png")  # changed content, size and mtime
    os.utime(image_dir / "img0.png", ns=(1, 1))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 images: 1 encoded now, 3 from the cache" in err
    cached = (model.encode_text("a red ball") @ model.encode_image(sorted(image_dir.rglob("*.png"))).T)[0].topk(3)
    assert main(args) == 0
    shown = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [float(s[1]) for s in shown] == pytest.approx(cached.values.tolist(), abs=1e-4)


def test_bad_input_is_one_line(runs, image_dir, tmp_path, capsys):
    run = str(runs["pal"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    code = main(["segment", str(bad), "--run", run, "--labels", "ball", "--no-progress"])
    one_line_error(capsys, code, "unreadable image")
    code = main(["segment", str(image_dir / "img0.png"), "--run", run, "--labels", " , ", "--no-progress"])
    one_line_error(capsys, code, "no labels")
    code = main(["classify", str(tmp_path / "nowhere"), "--run", run, "--labels", "a"])
    one_line_error(capsys, code, "no such folder")
    one_line_error(capsys, main(["search", str(image_dir), "--run", str(tmp_path), "--query", "x"]), "run.json")


def test_runs_that_cannot_be_rebuilt(runs, world_features, tmp_path, tiny_dinov2, tiny_bert, capsys):
    """A run dir is self-contained (run.json records the encoders); what it lacks, or weights that differ, or an
    encoder that cannot be loaded, is named in one line."""
    moved = tmp_path / "moved"
    shutil.copytree(runs["procrustes"], moved)
    meta = json.loads((moved / "run.json").read_text())
    assert {"image_size", "resize", "layer", "dtype"} <= set(meta["encoders"]["image"])
    assert {"max_length", "pooling", "layer", "dtype"} <= set(meta["encoders"]["text"])
    meta["image_store"] = meta["text_store"] = str(tmp_path / "gone.zarr")
    (moved / "run.json").write_text(json.dumps(meta))
    assert torch.equal(
        api.load(moved, device="cpu").encode_text("a ball"),
        api.load(runs["procrustes"], device="cpu").encode_text("a ball"),
    )

    (moved / "run.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "encoders"}))
    with pytest.raises(PipeError, match="image_size, resize not recorded"):
        api.load(moved)
    meta["encoders"]["image"]["weights"] = "some other checkpoint"
    (moved / "run.json").write_text(json.dumps(meta))
    with pytest.raises(PipeError, match="weights='some other checkpoint'"):
        api.load(moved)

    # encoders that are gone: a copy of the tiny DINOv2 folder, extracted and aligned with, then deleted
    model_dir = tmp_path / "dino-copy"
    shutil.copytree(tiny_dinov2, model_dir)
    feats = tmp_path / "feats"
    for enc, text in ((f"hf:{model_dir}", "auto"), (f"hf:{tiny_bert}", "captions")):
        run_extract(
            ExtractConfig(
                encoder=enc, dataset="world", split="train", features=str(feats), text=text, options=(("size", 6),)
            ),
            progress=False,
        )
    run = train(feats, tmp_path / "run", "procrustes")
    shutil.rmtree(model_dir)
    image = tmp_path / "x.png"
    val_images()[0].save(image)
    assert main(["segment", str(image), "--run", str(run), "--labels", "ball", "--no-progress"]) == 2
    err = one_line_error(capsys, 2)
    assert "cannot load its image encoder" in err and "does not exist" in err


# -- real encoders ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_api_equals_eval_with_offline_dinov2_and_minilm(tmp_path, one_thread):
    from pipe_align.extract.encoders.local import local_source

    if local_source("dinov2-small") is None or local_source("minilm") is None:
        pytest.skip("offline DINOv2-S / MiniLM not prepared (make offline)")
    feats = tmp_path / "feats"
    for split, size in (("train", 16), ("val", 4)):
        for enc, text in (("dinov2-small", "auto"), ("minilm", "captions"), ("minilm", "prompts")):
            if split == "train" and text == "prompts":
                continue
            run_extract(
                ExtractConfig(
                    encoder=enc,
                    dataset="world",
                    split=split,
                    features=str(feats),
                    text=text,
                    options=(("size", size),),
                    batch_size=4,
                ),
                progress=False,
            )
    run = train(feats, tmp_path / "pal", "pal", anchors=32)
    model = api.load(run, device="cpu")
    cfg = EvalConfig(
        task="segmentation",
        dataset="world",
        split="val",
        features=str(feats),
        run=str(run),
        device="cpu",
        protocol="pal",
        options=(("size", 4),),
        examples=4,
    )
    ctx = load_context(cfg, "prompts", EXTRACT_OPTIONS)
    world = get_dataset("world", None, "val", size=4)
    images = [world.load_image(i) for i in range(4)]
    assert torch.allclose(model.encode_image(images), embed_images(ctx.aligner, ctx.image, "cpu"), atol=EMB_TOL)
    weights, classes = class_weights(ctx)
    assert torch.allclose(model.classifier(classes), weights, atol=EMB_TOL)
    _, extras = run_segmentation(ctx)
    for _, item, _, pred in extras["examples"]:
        same = (model.segment(images[item], classes[1:]).labels.numpy() == pred).mean()
        assert same >= 0.999, f"image {item}: {same:.4f} of pixels agree"
