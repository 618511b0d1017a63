"""`pipe eval` and `pipe report` on hand-made stores whose right answers are known.

No encoder runs: features are written straight into stores. Class c is the one-hot e_c; a patch holds e_c of the
majority class of its cell in the real mask of a world image written in the VOC layout; an image's CLS is e_label
plus a small per-image offset; a caption's pooled vector is its image's CLS and its tokens are its image's patches.
A test-local aligner ("identity-test") maps store rows to themselves, so a correct evaluation must score perfectly
(classification, retrieval) or recover the masks at patch resolution (segmentation), and a shifted mapping must not.
It is in the global method registry only while a test that asks for the `identity_method` fixture runs.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import zarr
from PIL import Image

from pipe_align.align.base import METHODS, Aligner, MethodConfig, l2n
from pipe_align.align.pal import PAL, PALConfig
from pipe_align.evaluate import figures
from pipe_align.evaluate.base import TASKS, Task, register_task
from pipe_align.evaluate.config import EvalConfig, figure_path
from pipe_align.evaluate.context import load_context
from pipe_align.evaluate.loading import embed_images, embed_texts
from pipe_align.evaluate.metrics import miou_reference
from pipe_align.evaluate.report import build_table
from pipe_align.evaluate.segmentation import SegmentationTask, run_segmentation, upsample_argmax
from pipe_align.evaluate.tasks import run_eval
from pipe_align.extract.datasets import World, get_dataset, write_world
from pipe_align.extract.datasets.ade20k import ADE20K_CLASSES
from pipe_align.extract.datasets.base import voc_palette
from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import StoreLayout, create_store, store_path
from pipe_align.pipelines.cli import main
from pipe_align.pipelines.eval_cmd import eval_app
from tests.helpers import one_line_error

D, GRID, CELL, TEMPLATES = 16, (8, 8), 28, ("a photo of a {}.", "a {}.")
CAPTION_ARRAYS = ("ids", "text", "item", "tokens", "length", "pooled")


@dataclass(frozen=True)
class IdentityConfig(MethodConfig):
    shift: int = 0  # rolls the patch order: a deliberately wrong dense mapping


class IdentityAligner(Aligner):
    name = "identity-test"  # set here, not by @register_method: registered only inside the identity_method fixture
    Config = IdentityConfig

    @classmethod
    def fit(cls, train, val, config, log, unpaired=None):
        return cls(config)

    def image_global(self, rows):
        return l2n(rows.cls)

    def text_global(self, rows):
        return l2n(rows.pooled)

    def image_dense(self, patches):
        return torch.roll(l2n(patches), self.config.shift, dims=1)

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("scale", torch.ones(1))  # a tensor to save: a run dir holds a non-empty weights file


@pytest.fixture
def identity_method():
    """identity-test in the method registry for one test (run dirs name it; load_aligner looks it up)."""
    METHODS.register(IdentityAligner.name, IdentityAligner)
    yield
    METHODS.unregister(IdentityAligner.name)


def encoder(alias: str, modality: str) -> dict:
    return {
        "alias": alias,
        "model_id": f"test/{alias}",
        "revision": None,
        "weights": "random",
        "modality": modality,
        "dim": D,
        "layer": "last",
        "image_size": 224,
        "patch_size": CELL,
        "num_register_tokens": 0,
        "pooling": None,
        "max_length": None,
    }


def write(path: Path, modality: str, alias: str, arrays: dict, skipped=None, dataset: str = "voc", **kw) -> None:
    n = len(arrays["ids"])
    tokens, dim = arrays["patches" if modality == "image" else "tokens"].shape[1:]
    lay = StoreLayout(
        modality=modality,
        encoder=encoder(alias, modality) | {"dim": dim},
        dataset=dataset,
        split="val",
        count=n,
        tokens=tokens,
        dim=dim,
        rows_per_chunk=2,
        rows_per_shard=4,
        **kw,
    )
    st = create_store(path, lay)
    for s in range(lay.num_shards):
        a, b = lay.shard_range(s)
        skip = np.zeros(b - a, bool) if skipped is None else skipped[a:b]
        st.write_shard(s, {k: v[a:b] for k, v in arrays.items()}, skip)
    st.finalize()


def majority(mask: np.ndarray) -> np.ndarray:
    """Majority class (void 255 left out) of each patch cell: [8, 8]."""
    out = np.zeros(GRID, np.int64)
    for i in range(GRID[0]):
        for j in range(GRID[1]):
            cell = mask[i * CELL : (i + 1) * CELL, j * CELL : (j + 1) * CELL].ravel()
            cell = cell[cell != 255]
            out[i, j] = np.bincount(cell).argmax() if len(cell) else 0
    return out


def build_stores(features: Path, root: Path, resize: str = "squash", all_skipped: bool = False) -> dict:
    ds = get_dataset("voc", root, "val")
    classes = list(ds.classes)
    eye = np.eye(D, dtype=np.float32)
    labels = np.array([r.label for r in World(None, "val", size=6).images()], np.int32)
    rng = np.random.default_rng(0)
    offsets = np.zeros((6, D), np.float32)
    offsets[:, len(classes) :] = rng.standard_normal((6, D - len(classes))) * 0.5
    cls = eye[labels] + offsets
    grids = [majority(ds.load_mask(i)) for i in range(6)]
    patches = np.stack([eye[g.ravel()] for g in grids])
    ids = np.array([r.id for r in ds.images()])
    n = len(ids)
    image = {
        "ids": ids,
        "cls": cls.astype(np.float16),
        "patches": patches.astype(np.float16),
        "labels": np.full(n, -1, np.int32) if all_skipped else labels,
    }
    skipped = np.ones(n, bool) if all_skipped else None
    write(
        store_path(features, "voc", "val", "img-test"),
        "image",
        "img-test",
        image,
        skipped,
        grid=GRID,
        resize=resize,
        classes=tuple(classes),
    )
    item = np.repeat(np.arange(len(classes)), len(TEMPLATES))
    scale = np.tile(np.arange(1, len(TEMPLATES) + 1), len(classes))[:, None]
    prompts = {
        "ids": np.array([f"{c}:{t}" for c, t in zip(item, range(len(item)))]),
        "text": np.array([TEMPLATES[t % 2].format(classes[c]) for t, c in enumerate(item)]),
        "item": item,
        "tokens": rng.standard_normal((len(item), 4, D)).astype(np.float16),
        "length": np.full(len(item), 4, np.int16),
        "pooled": (eye[item] * scale).astype(np.float16),
    }
    path = store_path(features, "voc", "val", "txt-test")
    write(
        path.with_name("txt-test.prompts.zarr"),
        "text",
        "txt-test",
        prompts,
        classes=tuple(classes),
        templates=TEMPLATES,
    )
    cap_item = np.repeat(np.arange(n), 2)
    captions = {
        "ids": np.array([f"{ids[i]}#{j % 2}" for j, i in enumerate(cap_item)]),
        "text": np.array([f"caption {j % 2} of image {i}" for j, i in enumerate(cap_item)]),
        "item": cap_item,
        "tokens": patches[cap_item].astype(np.float16),
        "length": np.full(len(cap_item), GRID[0] * GRID[1], np.int16),
        "pooled": cls[cap_item].astype(np.float16),
    }
    write(path, "text", "txt-test", captions)
    return {"classes": classes, "grids": grids, "labels": labels}


def make_run(path: Path, aligner: Aligner, **meta) -> Path:
    aligner.save(path)
    run = {
        "method": aligner.name,
        "image_encoder": "img-test",
        "text_encoder": "txt-test",
        "dataset": "voc",
        "split": "train",
        "tokens": {"image": "patches"},
    } | meta
    (path / "run.json").write_text(json.dumps(run))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    root = write_world(base / "data", "val", size=6, layouts=("voc",))
    seg = root / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    first = sorted(seg.glob("*.png"))[0]  # a band of void pixels in one mask: must be ignored
    mask = np.array(Image.open(first))
    mask[:10] = 255
    png = Image.fromarray(mask, mode="P")
    png.putpalette(voc_palette())
    png.save(first)
    facts = build_stores(base / "features", root)
    pal = PAL(PALConfig(anchors=16, use_cls=False), image_dim=D, text_dim=D)  # patches vs words: no CLS
    pal.set_anchors(pal.image_anchors.detach(), pal.image_anchors.detach().clone())  # same anchors both sides
    # (identical tokens give equal profiles)
    runs = {
        "a": make_run(base / "runs" / "ident", IdentityAligner(IdentityConfig())),
        "shifted": make_run(base / "runs" / "shifted", IdentityAligner(IdentityConfig(shift=GRID[1]))),
        "pal": make_run(base / "runs" / "pal", pal),
    }
    return {"base": base, "root": root, "features": base / "features", "runs": runs, **facts}


def cli(
    env, task: str, run: Path, *extra: str, features: Path | None = None, root: Path | None = None, dataset: str = "voc"
) -> int:
    return main(
        [
            "eval",
            task,
            "--dataset",
            dataset,
            "--root",
            str(root or env["root"]),
            "--split",
            "val",
            "--features",
            str(features or env["features"]),
            "--run",
            str(run),
            "--device",
            "cpu",
            *extra,
        ]
    )


def result(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / f"{name}.json").read_text())


@pytest.mark.usefixtures("identity_method")
def test_classification_recovers_labels(env, capsys):
    run = env["runs"]["a"]
    assert cli(env, "classification", run) == 0
    res = result(run, "classification-voc-val")
    assert res["acc1"] == 1.0 and res["acc5"] == 1.0 and res["balanced_acc"] == 1.0
    assert res["background_excluded"] is True and res["classes"] == 12 and res["images"] == 6
    per_class = {k: v for k, v in res.items() if k.startswith("acc/")}
    assert per_class and all(v == 1.0 for v in per_class.values())
    assert res["config"]["image_encoder"] == "img-test" and res["method"] == "identity-test"
    assert "acc1" in capsys.readouterr().out


@pytest.mark.usefixtures("identity_method")
def test_retrieval_recovers_pairs(env, tmp_path):
    run = env["runs"]["a"]
    assert cli(env, "retrieval", run) == 0
    res = result(run, "retrieval-voc-val")
    for k in (1, 5, 10):
        assert res[f"text_retrieval_recall@{k}"] == 1.0 and res[f"image_retrieval_recall@{k}"] == 1.0
    assert res["images"] == 6 and res["captions"] == 12
    assert (run / "eval" / "figures" / "retrieval-voc-val-examples.png").stat().st_size > 0


@pytest.mark.usefixtures("identity_method")
def test_retrieval_leaves_images_without_captions_out_of_image_to_text(env, tmp_path, capsys):
    """The last image loses its captions: image->text is still perfect over the five images that have some (it was
    5/6 when a captionless image counted as a miss), and the JSON and the printed lines say one was left out."""
    features = tmp_path / "features"
    shutil.copytree(env["features"], features)
    path = store_path(features, "voc", "val", "txt-test")
    old = {k: np.asarray(v[:]) for k, v in zarr.open_group(str(path), mode="r").arrays() if k in CAPTION_ARRAYS}
    keep = old["item"] != 5
    shutil.rmtree(path)
    write(path, "text", "txt-test", {k: v[keep] for k, v in old.items()})
    run = shutil.copytree(env["runs"]["a"], tmp_path / "run")  # its results stay apart from the other tests'
    assert cli(env, "retrieval", run, "--no-figures", features=features) == 0
    res = result(run, "retrieval-voc-val")
    for k in (1, 5, 10):
        assert res[f"text_retrieval_recall@{k}"] == 1.0 and res[f"image_retrieval_recall@{k}"] == 1.0
    assert res["images"] == 6 and res["captions"] == 10 and res["images_without_captions"] == 1
    assert any(line.split() == ["images_without_captions", "1"] for line in capsys.readouterr().out.splitlines())


@pytest.mark.usefixtures("identity_method")
def test_segmentation_recovers_masks_at_patch_resolution(env):
    run = env["runs"]["a"]
    assert cli(env, "segmentation", run, "--protocol", "pal") == 0
    res = result(run, "segmentation-voc-val-pal")
    ds = get_dataset("voc", env["root"], "val")
    masks = [ds.load_mask(i) for i in range(6)]
    assert res["protocol"] == "pal" and res["pixels"] == sum(int((m != 255).sum()) for m in masks)  # void ignored
    assert res["images"] == 6 and res["num_classes"] == 13
    # at patch resolution the best possible answer is the cell majority upsampled: bilinear argmax of one-hot scores
    # is nearest-cell assignment except near cell corners, so the numbers must match that reference closely
    ref = miou_reference([np.kron(g, np.ones((CELL, CELL), np.int64)) for g in env["grids"]], masks, 13)
    assert abs(res["mIoU"] - ref["mIoU"]) < 0.02 and abs(res["aAcc"] - ref["aAcc"]) < 0.01
    assert res["mIoU"] > 0.6 and res["fg_mIoU"] > 0.55 and res["aAcc"] > 0.9
    assert {f"iou/{c}" for c in env["classes"]} <= set(res)
    # exact alignment: the prediction has the mask's shape and, at every cell centre, the cell's majority class
    cfg = EvalConfig(
        "segmentation", "voc", "val", str(env["features"]), str(run), str(env["root"]), "pal", figures=False, examples=6
    )
    _, extras = run_segmentation(load_context(cfg, SegmentationTask.text))
    centres = np.arange(GRID[0]) * CELL + CELL // 2 - 1
    for row, index, mask, pred in extras["examples"]:
        assert pred.shape == mask.shape == masks[index].shape
        np.testing.assert_array_equal(pred[np.ix_(centres, centres)], env["grids"][row])
    figs = run / "eval" / "figures"
    assert (figs / "segmentation-voc-val-pal-overlays.png").is_file()
    assert (figs / "segmentation-voc-val-pal-class-iou.png").is_file()


@pytest.mark.usefixtures("identity_method")
def test_segmentation_shifted_mapping_scores_lower(env):
    assert cli(env, "segmentation", env["runs"]["a"], "--no-figures") == 0  # computed here, never a stale result
    good = result(env["runs"]["a"], "segmentation-voc-val-pal")
    bad_run = env["runs"]["shifted"]
    assert cli(env, "segmentation", bad_run, "--no-figures") == 0
    bad = result(bad_run, "segmentation-voc-val-pal")
    assert bad["mIoU"] < good["mIoU"] - 0.15 and bad["fg_mIoU"] < good["fg_mIoU"] - 0.15


def test_upsample_argmax_by_class_chunks_equals_full_argmax():
    scores = torch.zeros(3, 2, 2)
    scores[1, 0, 0] = scores[2, 1, 1] = 1.0
    pred = upsample_argmax(scores, (8, 6), chunk=1)  # chunked over classes: must equal the plain argmax
    ref = torch.nn.functional.interpolate(scores[None], size=(8, 6), mode="bilinear", align_corners=False)[0]
    assert pred.shape == (8, 6) and torch.equal(pred, ref.argmax(0))


@pytest.mark.usefixtures("identity_method")
def test_segmentation_standard_label_spaces(env):
    run = env["runs"]["a"]
    assert cli(env, "segmentation", run, "--protocol", "standard", "--no-figures") == 0
    res = result(run, "segmentation-voc-val-standard")
    assert res["protocol"] == "standard" and "sliding window" in res["protocol_note"]
    assert res["bg_ignored/label_space"] == "background-ignored" and res["bg_ignored/mIoU"] > 0.7
    assert "background" not in {k.split("/")[-1] for k in res if k.startswith("bg_ignored/iou/")}


def test_diagnostics_on_anchor_method(env):
    run = env["runs"]["pal"]
    assert cli(env, "diagnostics", run) == 0
    res = result(run, "diagnostics-voc-val")
    assert res["anchors"] == 16 and res["pairs"] == 6
    assert res["dice_top5_matched"] == 1.0 and res["dice_top5_mismatched"] < 0.9
    assert 1 <= res["image_anchors_used"] <= 16 and 0 <= res["image_usage_entropy"] <= 1
    assert "text_anchors_used" in res
    for name in ("anchor-usage", "dice", "anchor-maps"):
        assert (run / "eval" / "figures" / f"diagnostics-voc-val-{name}.png").is_file()


@pytest.mark.usefixtures("identity_method")
def test_skip_existing(env, capsys):
    run = env["runs"]["a"]
    path = run / "eval" / "classification-voc-val.json"
    if not path.is_file():
        assert cli(env, "classification", run) == 0
    path.write_text(json.dumps({"task": "classification", "sentinel": True}))
    capsys.readouterr()
    assert cli(env, "classification", run, "--skip-existing") == 0
    assert "skipped" in capsys.readouterr().out and json.loads(path.read_text())["sentinel"]
    assert cli(env, "classification", run) == 0  # without the flag it is recomputed
    assert "sentinel" not in json.loads(path.read_text())


@pytest.mark.usefixtures("identity_method")
def test_bad_inputs_are_one_line_errors(env, capsys, tmp_path):
    runs = env["runs"]
    one_line_error(capsys, cli(env, "diagnostics", runs["a"]), "no anchors")
    no_prompts = make_run(tmp_path / "np", IdentityAligner(IdentityConfig()), text_encoder="txt-other")
    one_line_error(
        capsys,
        cli(env, "classification", no_prompts),
        "pipe extract --encoder txt-other --dataset voc --split val",
        "--text prompts",
    )
    other = make_run(
        tmp_path / "other",
        IdentityAligner(IdentityConfig()),
        image_store={"encoder": encoder("img-test", "image") | {"model_id": "other/model"}},
    )
    one_line_error(capsys, cli(env, "classification", other), "model_id", "other/model")
    layer = make_run(tmp_path / "layer", IdentityAligner(IdentityConfig()), text_layer="-2")  # as pipe align writes it
    one_line_error(capsys, cli(env, "retrieval", layer), "layer='last'", "layer='-2'")
    no_masks = tmp_path / "nomasks"
    shutil.copytree(env["root"], no_masks)
    shutil.rmtree(no_masks / "VOCdevkit" / "VOC2012" / "SegmentationClass")
    one_line_error(capsys, cli(env, "segmentation", runs["a"], root=no_masks), "no segmentation masks")
    crop = tmp_path / "crop"
    build_stores(crop, env["root"], resize="crop")
    one_line_error(capsys, cli(env, "segmentation", runs["a"], features=crop), "--resize squash")
    empty = tmp_path / "empty"
    build_stores(empty, env["root"], all_skipped=True)
    one_line_error(capsys, cli(env, "classification", runs["a"], features=empty), "no labelled images")
    one_line_error(capsys, cli(env, "segmentation", runs["a"], features=empty), "skipped")
    (tmp_path / "notarun").mkdir()
    one_line_error(capsys, cli(env, "retrieval", tmp_path / "notarun"), "run.json")
    one_line_error(capsys, cli(env, "segmentation", runs["a"], "--protocol", "mmseg"), "--protocol")


@pytest.mark.usefixtures("identity_method")
def test_report_table(env, capsys, tmp_path):
    runs = env["runs"]
    for run in (runs["a"], runs["shifted"]):
        assert cli(env, "classification", run, "--skip-existing", "--no-figures") == 0
        assert cli(env, "segmentation", run, "--skip-existing", "--no-figures") == 0
    capsys.readouterr()
    out = tmp_path / "cmp.md"
    assert main(["report", str(runs["a"]), str(runs["shifted"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = out.read_text()
    assert "| ident | identity-test |" in md and "| shifted | identity-test |" in md and "ident" in printed
    assert "voc/val acc1" in md and "voc/val seg[pal] mIoU" in md and "100.0" in md
    lines = (tmp_path / "cmp.csv").read_text().splitlines()
    assert lines[0].startswith("run,method,") and len(lines) == 3
    assert main(["report", str(runs["a"])]) == 0
    assert (runs["a"].parent / "report.md").is_file() and (runs["a"].parent / "report.csv").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    assert main(["report", str(runs["a"]), "--out", str(blocker / "cmp.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and str(blocker) in err


# -- label spaces come from the dataset reader ------------------------------------------------------------------------


def build_ade(env, base: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """The env's images in the ADE20K layout (world label k -> ADE label k, so 0 = "other"; the void band kept) and
    one-hot stores over ADE20K's 151 classes: (root, features, masks)."""
    voc = get_dataset("voc", env["root"], "val")
    ade = base / "ade" / "ADEChallengeData2016"
    masks = [voc.load_mask(i) for i in range(len(voc))]
    for sub in ("images", "annotations"):
        (ade / sub / "validation").mkdir(parents=True)
    for rec, mask in zip(voc.images(), masks, strict=True):
        jpg = env["root"] / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{rec.id}.jpg"
        shutil.copy(jpg, ade / "images" / "validation" / jpg.name)
        Image.fromarray(mask, "L").save(ade / "annotations" / "validation" / f"{rec.id}.png")
    c = len(ADE20K_CLASSES)
    eye = np.eye(c + 1, dtype=np.float16)
    ids = np.array([r.id for r in voc.images()])
    patches = np.stack([eye[g.ravel()] for g in env["grids"]])
    image = {
        "ids": ids,
        "cls": eye[np.arange(len(ids)) + 1],
        "patches": patches,
        "labels": np.full(len(ids), -1, np.int32),
    }
    features = base / "features-ade"
    write(
        store_path(features, "ade20k", "val", "img-test"),
        "image",
        "img-test",
        image,
        dataset="ade20k",
        grid=GRID,
        resize="squash",
        classes=tuple(ADE20K_CLASSES),
    )
    item = np.arange(c)
    prompts = {
        "ids": item.astype(str),
        "text": np.array(ADE20K_CLASSES),
        "item": item,
        "pooled": eye[item],
        "tokens": np.zeros((c, 2, c + 1), np.float16),
        "length": np.full(c, 2, np.int16),
    }
    write(
        features / "ade20k" / "val" / "txt-test.prompts.zarr",
        "text",
        "txt-test",
        prompts,
        dataset="ade20k",
        classes=tuple(ADE20K_CLASSES),
        templates=("{}",),
    )
    write(
        features / "ade20k" / "val" / "txt-test.pal.prompts.zarr",
        "text",
        "txt-test",
        prompts,
        dataset="ade20k",
        classes=tuple(ADE20K_CLASSES),
        templates=("{}",),
        prompts="pal",
    )  # --protocol pal reads it
    return base / "ade", features, masks


@pytest.mark.usefixtures("identity_method")
def test_segmentation_zero_label_ignored_as_the_reader_says(env, tmp_path):
    root, features, masks = build_ade(env, tmp_path)
    run = make_run(tmp_path / "run", IdentityAligner(IdentityConfig()))
    counted = sum(int(((m != 0) & (m != 255)).sum()) for m in masks)  # label 0 ("other") and void never count
    # standard: mmseg's 150-way; pal: the PAL authors' 151-way, class 0's prompt competes (tests/test_baselines.py)
    for protocol, space, n in (("pal", "zero-competes", 151), ("standard", "zero-ignored", 150)):
        assert (
            cli(
                env,
                "segmentation",
                run,
                "--protocol",
                protocol,
                "--no-figures",
                features=features,
                root=root,
                dataset="ade20k",
            )
            == 0
        )
        res = result(run, f"segmentation-ade20k-val-{protocol}")
        assert res["label_space"] == space and res["num_classes"] == n and res["pixels"] == counted
        assert ("iou/other" in res) == (protocol == "pal") and "iou/wall" in res and "fg_mIoU" not in res
        assert not any(k.startswith("bg_ignored/") for k in res) and res["mIoU"] > 0.6


@pytest.mark.usefixtures("identity_method")
def test_background_is_the_readers_fact_not_a_class_name(env, tmp_path):
    """In the VOC layout palette index 0 is background, whatever classes.txt calls it."""
    root = tmp_path / "renamed"
    shutil.copytree(env["root"], root)
    (root / "VOCdevkit" / "VOC2012" / "classes.txt").write_text("\n".join(["sky", *env["classes"][1:]]) + "\n")
    build_stores(tmp_path / "features", root)
    run = make_run(tmp_path / "run", IdentityAligner(IdentityConfig()))
    assert cli(env, "classification", run, features=tmp_path / "features", root=root) == 0
    res = result(run, "classification-voc-val")
    assert res["background_excluded"] is True and res["classes"] == 12 and "acc/sky" not in res
    assert res["acc1"] == 1.0


# -- the task registry ------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_task():
    """A task that exists only in this test module, registered exactly as a task file registers itself, and removed
    again afterwards."""

    @register_task("tiny-test")
    class PairCosine(Task):
        """Mean cosine of each caption with its own image (image_global vs text_global)."""

        text = "captions"
        protocols = {"first": "the default protocol", "second": "another protocol"}
        columns = (("pair_cosine", "pair cos"),)
        report_tag = "tiny"

        def run(self, ctx):
            images = embed_images(ctx.aligner, ctx.image, ctx.cfg.device)
            texts = embed_texts(ctx.aligner, ctx.text, ctx.cfg.device)
            item = torch.from_numpy(ctx.text["item"][:].astype(np.int64))
            cos = (l2n(images[item]) * l2n(texts)).sum(dim=1)
            return {"pair_cosine": cos.mean().item(), "pairs": len(cos)}, {"cos": cos.numpy()}

        def figures(self, ctx, result, extras, notes):
            path, mean = figure_path(ctx.cfg, "cos"), float(extras["cos"].mean())
            return [figures.class_iou_bars(path, ["mean"], [mean], self.figure_title(ctx, result))]

    try:
        yield PairCosine
    finally:
        TASKS.unregister("tiny-test")


@pytest.mark.usefixtures("identity_method")
def test_a_new_task_is_one_class(env, tiny_task):
    run = env["runs"]["a"]
    cfg = EvalConfig("tiny-test", "voc", "val", str(env["features"]), str(run), str(env["root"]))
    out = run_eval(cfg)
    res = out.result
    assert res["task"] == "tiny-test" and res["protocol"] == "first" and res["protocol_note"] == "the default protocol"
    assert res["pair_cosine"] == pytest.approx(1.0, abs=1e-4) and res["pairs"] == 12  # caption pooled = image cls
    assert out.path.name == "tiny-test-voc-val-first.json" and json.loads(out.path.read_text())["pairs"] == 12
    assert [p.name for p in out.figures] == ["tiny-test-voc-val-first-cos.png"] and out.figures[0].stat().st_size > 0
    header, rows = build_table([run])
    col = "voc/val tiny[first] pair cos"
    assert col in header and rows[0][header.index(col)] == res["pair_cosine"]
    with pytest.raises(PipeError, match="--protocol must be one of first, second, got 'third'"):
        run_eval(replace(cfg, protocol="third"))
    with pytest.raises(ValueError, match="task 'tiny-test' is already registered"):
        register_task("tiny-test")(type("Again", (tiny_task,), {}))
    assert TASKS.get("tiny-test") is tiny_task


def test_registries_hold_no_test_entries_outside_their_fixtures():
    """Importing this module registers nothing, and the fixtures above leave no entry behind (runs after them)."""
    import tests.test_eval  # noqa: F401

    assert "identity-test" not in METHODS and "tiny-test" not in TASKS
    assert TASKS.names() == ["classification", "collapse", "diagnostics", "grounding", "retrieval", "segmentation"]


def test_task_registry_refuses_duplicates_and_names_the_choices(env):
    with pytest.raises(ValueError, match="task 'segmentation' is already registered"):
        register_task("segmentation")(type("Other", (SegmentationTask,), {}))
    assert TASKS.get("segmentation") is SegmentationTask
    cfg = EvalConfig("nope", "voc", "val", str(env["features"]), str(env["runs"]["a"]))
    with pytest.raises(
        PipeError,
        match=r"unknown task 'nope'; valid: classification, collapse, diagnostics, "
        r"grounding, retrieval, segmentation$",
    ):
        run_eval(cfg)
    with pytest.raises(PipeError, match="--protocol applies to segmentation only, not retrieval"):
        run_eval(replace(cfg, task="retrieval", protocol="pal"))


def test_eval_commands_follow_the_task_registry():
    """One `pipe eval` command per task, with --protocol exactly where the task takes one (default from the
    registry: None on the command line) and the task's summary as its help."""
    group = typer.main.get_command(eval_app)
    assert sorted(group.commands) == TASKS.names()
    for name, command in group.commands.items():
        task = TASKS.get(name)
        options = {p.name: p for p in command.params}
        assert ("protocol" in options) == bool(task.protocols), name
        if task.protocols:
            first = next(iter(task.protocols))
            assert options["protocol"].default is None and f"{first} (default)" in options["protocol"].help
            assert all(p in options["protocol"].help for p in task.protocols)
        assert command.help.strip() == inspect.getdoc(task).split("\n\n")[0].replace("\n", " ")
