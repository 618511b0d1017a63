"""Dataset readers on tiny fixtures written in the real on-disk layouts, and the procedural world."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipe_align.extract.datasets import DATASETS, UnreadableImage, dataset_class, get_dataset, write_world
from pipe_align.extract.datasets.ade20k import ADE20K_CLASSES
from pipe_align.extract.datasets.base import voc_palette
from pipe_align.extract.datasets.pascal_context import PASCAL_CONTEXT_CLASSES
from pipe_align.extract.datasets.voc import VOC_CLASSES
from pipe_align.extract.datasets.world import CLASSES as WORLD_CLASSES
from pipe_align.extract.datasets.world import World
from pipe_align.extract.errors import PipeError


def jpg(path: Path, w: int = 20, h: int = 16, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, quality=95)
    return path


def palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    img.putpalette(voc_palette())
    img.save(path)


def raises(match: str, fn, *args, **kwargs) -> str:
    """Call fn, expect a one-line PipeError containing `match`; return the message."""
    with pytest.raises(PipeError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert match in msg, msg
    assert "\n" not in msg
    return msg


def rand_mask(seed: int, w: int = 20, h: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 21, (h, w)).astype(np.uint8)
    m[0, :] = 255
    return m


# ------------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name_lists_choices():
    for name in ("voc", "coco", "coco-karpathy", "flickr30k", "imagefolder", "ade20k", "fashion-mnist", "world"):
        assert DATASETS.get(name).name == name
    msg = raises("unknown dataset 'nope'", get_dataset, "nope", None, "val")
    assert "voc" in msg and "world" in msg and "fashion-mnist" in msg


def test_label_space_facts_are_class_attributes():
    """What evaluation reads by dataset name, without opening a file: the background class, label 0 ignored, void.
    Each fact must agree with the reader's class list."""
    background = {
        "voc": VOC_CLASSES,
        "world": WORLD_CLASSES,
        "pascal-context": PASCAL_CONTEXT_CLASSES,
        "pascal-context-mat": PASCAL_CONTEXT_CLASSES,
    }
    for name, cls in DATASETS.items():
        assert dataset_class(name.upper()) is cls and cls.ignore_index == 255
        assert cls.background == (0 if name in background else None), name
        assert cls.reduce_zero_label == (name in ("ade20k", "pascal-context-59")), name
    assert all(classes[0] == "background" for classes in background.values()) and ADE20K_CLASSES[0] == "other"
    assert "coco, " in raises("unknown dataset 'nope'; valid: ade20k, ", dataset_class, "nope")  # sorted


def test_bad_option_split_and_missing_root(tmp_path):
    raises("option 'colour'", get_dataset, "world", None, "train", colour=1)
    raises("split 'dev'", get_dataset, "world", None, "dev")
    raises("option seed='x'", get_dataset, "world", None, "train", seed="x")
    raises(str(tmp_path / "absent"), get_dataset, "voc", tmp_path / "absent", "val")
    raises("needs a root", get_dataset, "coco", None, "val")


# ------------------------------------------------------------------------------------------------------------ voc


@pytest.fixture
def voc_root(tmp_path) -> Path:
    year = tmp_path / "VOCdevkit" / "VOC2012"
    for k, i in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        jpg(year / "JPEGImages" / f"{i}.jpg")
        palette_png(year / "SegmentationClass" / f"{i}.png", rand_mask(k))
    sets = year / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n2007_000039\n2007_000032\n\n")
    (sets / "val.txt").write_text("2007_000063\n")
    return tmp_path


def test_voc_reads_ids_masks_and_classes(voc_root):
    for root in (voc_root, voc_root / "VOCdevkit", voc_root / "VOCdevkit" / "VOC2012"):
        ds = get_dataset("voc", root, "train")
        assert [r.id for r in ds.images()] == ["2007_000032", "2007_000039"]
    assert all(r.label == -1 for r in ds.images())
    assert ds.classes == VOC_CLASSES and len(ds.classes) == 21 and ds.classes[1] == "aeroplane"
    assert ds.has_masks() and ds.captions() is None and "{}" in ds.templates()[0]
    for i, k in enumerate([0, 1]):
        mask = ds.load_mask(i)
        assert mask.dtype == np.uint8 and np.array_equal(mask, rand_mask(k))  # indices, not RGB; 255 kept
        assert ds.load_image(i).mode == "RGB" and ds.load_image(i).size == (mask.shape[1], mask.shape[0])


def test_voc_bad_inputs(voc_root):
    year = voc_root / "VOCdevkit" / "VOC2012"
    (year / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000063\n2099_000001\n")
    msg = raises("2099_000001", get_dataset, "voc", voc_root, "val")
    assert "val.txt" in msg
    raises("test.txt", get_dataset, "voc", voc_root, "test")
    Image.new("RGB", (20, 16)).save(year / "SegmentationClass" / "2007_000032.png")  # an RGB mask
    with pytest.raises(UnreadableImage, match="2007_000032"):
        get_dataset("voc", voc_root, "train").load_mask(0)
    palette_png(year / "SegmentationClass" / "2007_000039.png", rand_mask(1, 10, 10))
    with pytest.raises(UnreadableImage, match="10x10"):
        get_dataset("voc", voc_root, "train").load_mask(1)
    (year / "JPEGImages" / "2007_000039.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImage, match="2007_000039"):
        get_dataset("voc", voc_root, "train").load_image(1)
    raises("expected the VOC layout", get_dataset, "voc", voc_root / "VOCdevkit" / "VOC2012" / "ImageSets", "val")


def test_voc_classes_file_overrides_names(voc_root):
    (voc_root / "VOCdevkit" / "VOC2012" / "classes.txt").write_text("background\nball\nstar\n")
    assert get_dataset("voc", voc_root, "val").classes == ["background", "ball", "star"]


# ----------------------------------------------------------------------------------------------------------- coco


def coco_json(root: Path, name: str, images: list, anns: list) -> Path:
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


@pytest.fixture
def coco_root(tmp_path) -> Path:
    for stem in ("000000000139", "000000000285"):
        jpg(tmp_path / "val2017" / f"{stem}.jpg")
    images = [
        {"id": 285, "file_name": "000000000285.jpg"},
        {"id": 139, "file_name": "000000000139.jpg"},
        {"id": 285, "file_name": "000000000285.jpg"},
    ]
    anns = [
        {"id": 11, "image_id": 139, "caption": "A room with chairs.\n"},
        {"id": 12, "image_id": 285, "caption": "  A big   brown bear. "},
        {"id": 13, "image_id": 139, "caption": "Chairs in a room."},
    ]
    coco_json(tmp_path, "captions_val2017.json", images, anns)
    return tmp_path


def test_coco_images_captions_and_links(coco_root):
    ds = get_dataset("coco", coco_root, "val")
    assert [r.id for r in ds.images()] == ["000000000285", "000000000139"]  # json order, de-duplicated
    caps = ds.captions()
    assert [(c.id, c.text, c.item) for c in caps] == [
        ("12", "A big brown bear.", 0),
        ("11", "A room with chairs.", 1),
        ("13", "Chairs in a room.", 1),
    ]
    assert ds.load_image(1).size == (20, 16) and ds.classes is None and ds.templates() == []


def test_coco_2014_names(tmp_path):
    jpg(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    coco_json(
        tmp_path,
        "captions_train2014.json",
        [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}],
        [{"id": 1, "image_id": 9, "caption": "food"}],
    )
    ds = get_dataset("coco", tmp_path, "train")
    assert ds.year == 2014 and [r.id for r in ds.images()] == ["COCO_train2014_000000000009"]
    raises("captions_train2017.json", get_dataset, "coco", tmp_path, "train", year=2017)


def test_coco_bad_inputs(coco_root):
    path = coco_root / "annotations" / "captions_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["caption"] = "   "
    path.write_text(json.dumps(data))
    msg = raises("empty caption", get_dataset, "coco", coco_root, "val")
    assert "captions_val2017.json" in msg and "13" in msg
    data["annotations"][2]["caption"] = "ok"
    data["images"].append({"id": 7, "file_name": "000000000007.jpg"})
    path.write_text(json.dumps(data))
    raises("000000000007.jpg", get_dataset, "coco", coco_root, "val")
    path.write_text('{"images": [}')
    msg = raises("malformed JSON", get_dataset, "coco", coco_root, "val")
    assert str(path) in msg
    data["images"].pop()
    data["annotations"].append({"id": 99, "image_id": 12345, "caption": "lost"})
    path.write_text(json.dumps(data))
    raises("caption 99 refers to image_id 12345", get_dataset, "coco", coco_root, "val")


# ------------------------------------------------------------------------------------------- flickr30k / karpathy


def karpathy_entry(name: str, split: str, texts: list[str], filepath: str | None = None) -> dict:
    entry = {"filename": name, "split": split, "sentences": [{"raw": t, "tokens": t.split()} for t in texts]}
    return entry | ({"filepath": filepath} if filepath else {})


@pytest.fixture
def flickr_root(tmp_path) -> Path:
    for stem in ("1000092795", "10002456", "1000268201"):
        jpg(tmp_path / "flickr30k-images" / f"{stem}.jpg")
    images = [
        karpathy_entry("1000092795.jpg", "train", ["Two young guys.", "Two men outside."]),
        karpathy_entry("10002456.jpg", "test", ["Workers look down."]),
        karpathy_entry("1000268201.jpg", "test", ["A child in pink.", "A little girl."]),
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return tmp_path


def test_flickr30k_split_captions_and_links(flickr_root):
    ds = get_dataset("flickr30k", flickr_root, "test")
    assert [r.id for r in ds.images()] == ["10002456", "1000268201"]
    assert [(c.id, c.text, c.item) for c in ds.captions()] == [
        ("10002456#0", "Workers look down.", 0),
        ("1000268201#0", "A child in pink.", 1),
        ("1000268201#1", "A little girl.", 1),
    ]
    assert [r.id for r in get_dataset("flickr30k", flickr_root, "train").images()] == ["1000092795"]
    assert get_dataset("flickr30k", flickr_root, "val").images() == []


def test_flickr30k_bad_inputs(flickr_root):
    path = flickr_root / "dataset_flickr30k.json"
    data = json.loads(path.read_text())
    data["images"][2]["sentences"][1]["raw"] = ""
    path.write_text(json.dumps(data))
    msg = raises("empty caption", get_dataset, "flickr30k", flickr_root, "test")
    assert "1000268201#1" in msg and "dataset_flickr30k.json" in msg
    data["images"][2]["filename"] = "999.jpg"
    path.write_text(json.dumps(data))
    raises("999.jpg", get_dataset, "flickr30k", flickr_root, "test")
    path.write_text("{oops")
    raises("malformed JSON in", get_dataset, "flickr30k", flickr_root, "test")


def test_coco_karpathy_merges_restval(tmp_path):
    jpg(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    jpg(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    images = [
        karpathy_entry("COCO_train2014_000000000009.jpg", "train", ["a"], "train2014"),
        karpathy_entry("COCO_val2014_000000000042.jpg", "restval", ["b"], "val2014"),
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    assert len(get_dataset("coco-karpathy", tmp_path, "train")) == 2
    assert len(get_dataset("coco-karpathy", tmp_path, "restval")) == 1


# ---------------------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_labels_and_ids(tmp_path):
    for cls, stems in {"dog": ["1", "2"], "cat": ["1"]}.items():
        for s in stems:
            jpg(tmp_path / "train" / cls / f"{s}.jpg")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = get_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["cat", "dog"]
    assert [(r.id, r.label) for r in ds.images()] == [("cat/1", 0), ("dog/1", 1), ("dog/2", 1)]
    raises(str(tmp_path / "val"), get_dataset, "imagefolder", tmp_path, "val")
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")
    assert [r.label for r in get_dataset("imagefolder", tmp_path, "train").images()] == [1, 0, 0]


# ------------------------------------------------------------------------------------------------------------ ade


def test_ade20k_masks_raw_with_other_at_zero(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    mask = np.random.default_rng(0).integers(0, 151, (16, 20)).astype(np.uint8)
    jpg(base / "images" / "validation" / "ADE_val_00000001.jpg")
    (base / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(mask, "L").save(base / "annotations" / "validation" / "ADE_val_00000001.png")
    for root in (tmp_path, base):
        ds = get_dataset("ade20k", root, "val")
        assert [r.id for r in ds.images()] == ["ADE_val_00000001"]
        assert np.array_equal(ds.load_mask(0), mask)
    assert len(ds.classes) == 151 and ds.classes[0] == "other" and ds.classes[1] == "wall"
    assert ds.classes[150] == "flag"
    jpg(base / "images" / "validation" / "ADE_val_00000002.jpg")
    msg = raises("ADE_val_00000002", get_dataset, "ade20k", tmp_path, "val")
    assert "annotation" in msg
    raises("training", get_dataset, "ade20k", tmp_path, "train")


# -------------------------------------------------------------------------------------------------- fashion-mnist


def write_idx(root: Path, prefix: str, pixels: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(root / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">4i", 2051, *pixels.shape) + pixels.tobytes())
    with opener(root / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">2i", 2049, len(labels)) + labels.tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([9, 0, 3, 3, 1], np.uint8)
    write_idx(tmp_path, "t10k", pixels, labels, gz)
    ds = get_dataset("fashion-mnist", tmp_path, "test")
    assert [r.label for r in ds.images()] == labels.tolist() and ds.images()[1].id == "00001"
    assert ds.classes[9] == "Ankle boot" and len(ds.classes) == 10
    img = ds.load_image(2)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img)[..., 1], pixels[2])
    raises("train-images-idx3-ubyte", get_dataset, "fashion-mnist", tmp_path, "train")
    clone = pickle.loads(pickle.dumps(ds))  # readers travel to dask workers
    assert np.array_equal(np.asarray(clone.load_image(2)), np.asarray(img))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_caption_pairs_subset(tmp_path, gz):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (8, 28, 28)).astype(np.uint8)
    labels = np.array([9, 0, 3, 3, 1, 0, 3, 9], np.uint8)
    write_idx(tmp_path, "train", pixels, labels, gz)
    ds = get_dataset("fashion-mnist", tmp_path, "train", per_class=1, classes="0,3,1", captions=True)
    assert [(r.id, r.label) for r in ds.images()] == [("00001", 0), ("00002", 3), ("00004", 1)]
    assert np.array_equal(np.asarray(ds.load_image(1))[..., 0], pixels[2])  # row 1 is file image 2
    caps = ds.captions()
    assert {c.item for c in caps} == {0, 1, 2} and len(caps) % 3 == 0
    assert all("dress" in c.text for c in caps if c.item == 1)
    assert all("trousers" in c.text for c in caps if c.item == 2)
    assert get_dataset("fashion-mnist", tmp_path, "train").captions() is None
    raises("option classes", get_dataset, "fashion-mnist", tmp_path, "train", classes="0,12")
    raises("per_class", get_dataset, "fashion-mnist", tmp_path, "train", per_class=0)


def test_fashion_mnist_bad_files(tmp_path):
    write_idx(tmp_path, "t10k", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    raises("has 3 images but", get_dataset, "fashion-mnist", tmp_path, "test")
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2i", 1234, 3))
    raises("magic 2049", get_dataset, "fashion-mnist", tmp_path, "test")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_debian_package_default_root():
    ds = get_dataset("fashion-mnist", None, "test")
    assert len(ds) == 10000 and ds.load_image(0).size == (28, 28) and ds.images()[0].label == 9


# ---------------------------------------------------------------------------------------------------------- world


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_world_is_deterministic_per_seed_and_split():
    a, b = World(None, "train", size=4), World(None, "train", size=4)
    for i in range(4):
        assert a.load_image(i).tobytes() == b.load_image(i).tobytes()
        assert np.array_equal(a.load_mask(i), b.load_mask(i))
    assert a.captions() == b.captions() and a.images() == b.images()
    c = World(None, "train", size=4, seed=1)
    assert a.load_image(0).tobytes() != c.load_image(0).tobytes()
    assert a.load_image(0).tobytes() != World(None, "val", size=4).load_image(0).tobytes()
    assert [r.id for r in a.images()] == ["train_00000", "train_00001", "train_00002", "train_00003"]
    assert pickle.loads(pickle.dumps(a)).load_image(3).tobytes() == b.load_image(3).tobytes()


def test_world_masks_labels_and_captions_agree():
    ds = get_dataset("world", None, "val", size=24)
    assert ds.classes == WORLD_CLASSES and ds.classes[0] == "background" and len(ds.classes) == 13
    caps = ds.captions()
    assert len(caps) == len({c.id for c in caps})
    names = set(ds.classes[1:])
    seen_classes = set()
    for i, rec in enumerate(ds.images()):
        img, mask = ds.load_image(i), ds.load_mask(i)
        assert img.mode == "RGB" and img.size == (224, 224) and mask.shape == (224, 224) and mask.dtype == np.uint8
        present = {ds.classes[k] for k in np.unique(mask) if k != 0}
        assert 1 <= len(present) <= 3 and (mask == 0).any() and mask.max() <= 12
        counts = np.bincount(mask.ravel(), minlength=13)
        assert counts[1:].argmax() + 1 == rec.label
        assert all(counts[ds.classes.index(c)] >= 3 * 14 * 14 for c in present)  # several patches each
        mine = [c.text for c in caps if c.item == i]
        assert 3 <= len(mine) <= 5 and len(set(mine)) == len(mine)
        mentioned = set().union(*(words(t) & names for t in mine))
        assert mentioned <= present  # no caption names an absent object
        assert words(mine[0]) & names == present  # the first caption names them all
        seen_classes |= present
    assert len(seen_classes) >= 8


def test_world_options_and_sizes():
    assert len(World(None, "train")) == 400 and len(World(None, "val")) == 100 and len(World(None, "test")) == 100
    small = get_dataset("world", "ignored", "test", size="3", image_size=160)
    assert len(small) == 3 and small.load_image(0).size == (160, 160) and small.load_mask(2).shape == (160, 160)
    raises("option size", get_dataset, "world", None, "train", size=-1)


def test_write_world_round_trip(tmp_path):
    write_world(tmp_path, "train", size=5, seed=7)
    write_world(tmp_path, "val", size=3, seed=7)
    world = World(None, "train", size=5, seed=7)
    voc = get_dataset("voc", tmp_path, "train")
    assert voc.classes == world.classes and [r.id for r in voc.images()] == [r.id for r in world.images()]
    assert len(get_dataset("voc", tmp_path, "val")) == 3
    for i in range(5):
        assert np.array_equal(voc.load_mask(i), world.load_mask(i))
        diff = np.abs(np.asarray(voc.load_image(i), float) - np.asarray(world.load_image(i), float))
        assert diff.mean() < 3.0
    with Image.open(tmp_path / "VOCdevkit/VOC2012/SegmentationClass/train_00000.png") as png:
        assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]
    coco = get_dataset("coco", tmp_path, "train")
    assert [r.id for r in coco.images()] == [r.id for r in world.images()]
    assert [(c.text, c.item) for c in coco.captions()] == [(c.text, c.item) for c in world.captions()]
    raises("layout 'tiff'", write_world, tmp_path, "train", 1, 0, ("tiff",))
