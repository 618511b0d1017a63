"""Classification readers (stl10, cifar10, cifar100, imagenet, imagefolder) on replicas of the authors' files
(tests/replicas): pixels decoded exactly as the formats define them, labels, CLIP's class names and templates, split
sizes, and a one-line error for every wrong layout; then `pipe extract` and `pipe eval classification` on one."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipe_align.extract.datasets import get_dataset
from pipe_align.pipelines.cli import main
from tests.replicas import cifar as cifar_replica
from tests.replicas import imagenet as imagenet_replica
from tests.replicas import replica
from tests.replicas import stl10 as stl10_replica
from tests.test_datasets import raises

CLIP_CIFAR_TEMPLATES = 18  # openai/CLIP data/prompts.md lists 18 templates for CIFAR10 and CIFAR100


def jpg(path: Path, colour=(200, 30, 30), suffix_format: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path, suffix_format, quality=100)
    return path


# ---------------------------------------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pixels_labels_names_and_sizes(tmp_path, name):
    root = replica(name, tmp_path)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    for split in ("train", "test"):
        images, labels = cifar_replica.pixels(name, split)
        for where in (root, folder):  # torchvision's root, or the unpacked folder itself
            ds = get_dataset(name, where, split)
            assert len(ds) == sum(cifar_replica.SIZES[name][split]) == len(images)
            assert [r.label for r in ds.images()] == labels.tolist()
            assert ds.images()[3].id == "00003"
        for i in range(len(images)):
            img = ds.load_image(i)
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), images[i])
    clone = pickle.loads(pickle.dumps(ds))  # to dask workers, without the pixels; they read them again
    assert clone._pixels is None
    assert np.array_equal(np.asarray(clone.load_image(2)), images[2])
    assert len(ds.templates()) == CLIP_CIFAR_TEMPLATES and ds.templates()[0] == "a photo of a {}."
    if name == "cifar10":
        assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    else:  # the meta file says aquarium_fish, lawn_mower: CLIP writes them with spaces
        assert len(ds.classes) == 100 and ds.classes[1] == "aquarium fish" and ds.classes[41] == "lawn mower"
        assert ds.classes[99] == "worm" and not any("_" in c for c in ds.classes)


def test_cifar_row_format_is_planes_of_rows(tmp_path):
    """The authors' definition: 1024 red values, then green, then blue, each plane row-major (32 per row)."""
    root = replica("cifar10", tmp_path)
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0 * 1024 + 1 * 32 + 5] = 200  # red at row 1, column 5
    row[0, 1 * 1024 + 31 * 32 + 0] = 100  # green at row 31, column 0
    row[0, 2 * 1024 + 0 * 32 + 7] = 50  # blue at row 0, column 7
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [4], b"data": row, b"filenames": [b"x.png"]}
    cifar_replica.dump(root / "cifar-10-batches-py" / "test_batch", batch)
    img = get_dataset("cifar10", root, "test").load_image(0)
    assert img.getpixel((5, 1)) == (200, 0, 0) and img.getpixel((0, 31)) == (0, 100, 0)
    assert img.getpixel((7, 0)) == (0, 0, 50) and np.asarray(img).sum() == 350


def test_cifar_wrong_roots_and_damaged_files(tmp_path):
    c10, c100 = replica("cifar10", tmp_path / "a"), replica("cifar100", tmp_path / "b")
    msg = raises("expected", get_dataset, "cifar10", tmp_path, "test")  # one level too high
    assert str(tmp_path / "cifar-10-batches-py" / "batches.meta") in msg
    msg = raises("cifar-100-python/meta", get_dataset, "cifar100", c10, "test")  # the other CIFAR
    assert "cifar-10-batches-py" in msg and "another dataset" in msg
    raises("another dataset", get_dataset, "cifar10", c100 / "cifar-100-python", "test")
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    raises("still packed; unpack it there (tar xzf cifar-10-python.tar.gz)", get_dataset, "cifar10", packed, "test")
    raises("split 'val'", get_dataset, "cifar10", c10, "val")
    folder = c10 / "cifar-10-batches-py"
    (folder / "data_batch_4").unlink()
    raises(f"file not found: {folder / 'data_batch_4'}", get_dataset, "cifar10", c10, "train")
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    raises(f"damaged pickle file {folder / 'test_batch'}", get_dataset, "cifar10", c10, "test")
    labels_short = {b"batch_label": b"x", b"labels": [1], b"data": np.zeros((2, 3072), np.uint8)}
    cifar_replica.dump(folder / "test_batch", labels_short)
    raises("2 images but 1 'labels'", get_dataset, "cifar10", c10, "test")
    cifar_replica.dump(folder / "test_batch", {b"labels": [10], b"data": np.zeros((1, 3072), np.uint8)})
    raises("label 10 outside 0..9", get_dataset, "cifar10", c10, "test")
    cifar_replica.dump(folder / "test_batch", {b"labels": [1], b"data": np.zeros((1, 32, 32, 3), np.uint8)})
    raises("N x 3072", get_dataset, "cifar10", c10, "test")
    with open(folder / "test_batch", "wb") as f:  # pickle.load would run this; the reader refuses it
        pickle.dump({"labels": [1], "data": Boom(str(tmp_path / "ran"))}, f, protocol=2)
    raises("refused to load", get_dataset, "cifar10", c10, "test")
    assert not (tmp_path / "ran").exists()
    np.save(folder / "test_batch", np.zeros(3))  # not a pickle at all
    shutil.move(folder / "test_batch.npy", folder / "test_batch")
    raises("damaged pickle file", get_dataset, "cifar10", c10, "test")


class Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ---------------------------------------------------------------------------------------------------------- stl10


def test_stl10_pixels_labels_names_and_sizes(tmp_path):
    root = replica("stl10", tmp_path)
    for split in ("train", "test"):
        images, labels = stl10_replica.pixels(split)
        for where in (root, root / "stl10_binary"):
            ds = get_dataset("stl10", where, split)
            assert len(ds) == stl10_replica.SIZES[split] and [r.label for r in ds.images()] == labels.tolist()
        for i in range(len(images)):
            assert np.array_equal(np.asarray(ds.load_image(i)), images[i])
    assert ds.classes == ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    assert ds.templates() == ["a photo of a {}.", "a photo of the {}."]
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(ds)).load_image(1)), images[1])
    raises("split 'unlabeled'", get_dataset, "stl10", root, "unlabeled")


def test_stl10_planes_are_column_major(tmp_path):
    """byte c*9216 + x*96 + y is channel c at column x, row y (MATLAB order; torchvision transposes the same)."""
    root = replica("stl10", tmp_path)
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[0 * 9216 + 5 * 96 + 1] = 200  # red at column 5, row 1
    raw[1 * 9216 + 0 * 96 + 95] = 100  # green at column 0, row 95
    (root / "stl10_binary" / "test_X.bin").write_bytes(raw.tobytes())
    (root / "stl10_binary" / "test_y.bin").write_bytes(bytes([10]))
    ds = get_dataset("stl10", root, "test")
    img = ds.load_image(0)
    assert ds.images()[0].label == 9 and img.getpixel((5, 1)) == (200, 0, 0) and img.getpixel((0, 95)) == (0, 100, 0)
    assert np.asarray(img).sum() == 300


def test_stl10_wrong_roots_and_damaged_files(tmp_path):
    root = replica("stl10", tmp_path / "r")
    msg = raises("expected", get_dataset, "stl10", tmp_path, "test")
    assert str(tmp_path / "stl10_binary" / "test_X.bin") in msg and "--root" in msg
    (tmp_path / "stl10_binary.tar.gz").write_bytes(b"\x1f\x8b")
    raises("still packed", get_dataset, "stl10", tmp_path, "test")
    folder = root / "stl10_binary"
    (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    raises("12 images but", get_dataset, "stl10", root, "test")
    (folder / "test_y.bin").write_bytes(bytes([0] * 12))
    raises("label 0, expected 1..10", get_dataset, "stl10", root, "test")
    (folder / "test_X.bin").write_bytes(b"\0" * 1000)
    raises("not a whole number of 3x96x96 images", get_dataset, "stl10", root, "test")
    (folder / "train_y.bin").unlink()
    raises(f"file not found: {folder / 'train_y.bin'}", get_dataset, "stl10", root, "train")


# ------------------------------------------------------------------------------------------------------- imagenet


def imagenet_expected() -> dict[str, int]:
    """id -> label from the replica's table (the position of the wnid among the sorted 1000)."""
    wnids = sorted(
        json.loads((Path(__file__).parents[1] / "extract/datasets/imagenet_classes.json").read_text())["classes"]
    )
    return {imagenet_replica.stem(i): wnids.index(w) for i, (w, _, _) in enumerate(imagenet_replica.ITEMS)}


@pytest.mark.parametrize("layout", ["folders", "devkit", "kaggle"])
def test_imagenet_layouts_labels_names_and_decoding(tmp_path, layout):
    build = {
        "folders": imagenet_replica.build,
        "devkit": imagenet_replica.build_devkit,
        "kaggle": imagenet_replica.build_kaggle,
    }[layout]
    root = build(tmp_path)
    ds = get_dataset("imagenet", root, "val")
    assert {r.id: r.label for r in ds.images()} == imagenet_expected() and len(ds) == 6
    assert len(ds.classes) == 1000 and ds.classes[0] == "tench" and ds.classes[999] == "toilet paper"
    assert ds.classes[278] == "kit fox" and len(ds.templates()) == 80 and ds.templates()[0] == "a bad photo of a {}."
    by_id = {r.id: i for i, r in enumerate(ds.images())}
    grey, cmyk = ds.load_image(by_id[imagenet_replica.stem(1)]), ds.load_image(by_id[imagenet_replica.stem(2)])
    assert grey.mode == "RGB" and np.all(np.asarray(grey) == 77)  # grayscale JPEG: grey RGB
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, int) - (255, 0, 0)).max() <= 3  # CMYK cyan 0 = red
    assert ds.load_image(by_id[imagenet_replica.stem(5)]).size == (60, 40)
    if layout == "folders":  # --root at the split folder itself, but not as another split
        assert {r.id: r.label for r in get_dataset("imagenet", root / "val", "val").images()} == imagenet_expected()
        raises("no ImageNet layout under", get_dataset, "imagenet", root / "val", "train")
    if layout == "devkit":  # or at the flat image folder beside the devkit
        assert {r.id: r.label for r in get_dataset("imagenet", root / "val", "val").images()} == imagenet_expected()


def test_imagenet_wrong_layouts(tmp_path):
    msg = raises("no ImageNet layout under", get_dataset, "imagenet", tmp_path, "val")
    assert "ILSVRC2012_validation_ground_truth.txt" in msg and "LOC_val_solution.csv" in msg and "<wnid>" in msg
    folders = imagenet_replica.build(tmp_path / "f")
    jpg(folders / "val" / "cat" / "1.JPEG")
    raises("val/cat is not one of the 1000 ILSVRC2012 class folders", get_dataset, "imagenet", folders, "val")
    shutil.rmtree(folders / "val" / "cat")
    shutil.copy(folders / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG", folders / "val" / "n04590129")
    raises("share the id ILSVRC2012_val_00000001", get_dataset, "imagenet", folders, "val")
    devkit = imagenet_replica.build_devkit(tmp_path / "d")
    data = devkit / "ILSVRC2012_devkit_t12" / "data"
    raises("only the val split", get_dataset, "imagenet", devkit, "train")
    (devkit / "val" / "ILSVRC2012_val_00000004.JPEG").unlink()
    raises("ILSVRC2012_val_00000004.JPEG is missing (listed in", get_dataset, "imagenet", devkit, "val")
    shutil.move(devkit / "val", devkit / "elsewhere")
    raises("lists ILSVRC2012_val_00000001.JPEG but no folder holds it", get_dataset, "imagenet", devkit, "val")
    gt = data / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n1001\n")
    raises("line 2: '1001' is not an ILSVRC2012_ID", get_dataset, "imagenet", devkit, "val")
    (data / "meta.mat").write_bytes(b"not a MATLAB file at all" * 8)
    raises("is not the devkit's meta.mat", get_dataset, "imagenet", devkit, "val")
    (data / "meta.mat").unlink()
    raises(f"file not found: {data / 'meta.mat'}", get_dataset, "imagenet", devkit, "val")
    kaggle = imagenet_replica.build_kaggle(tmp_path / "k")
    csv_path = kaggle / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,x9 1 2 3 4\n")
    raises("row for ILSVRC2012_val_00000001 has no ILSVRC2012 wnid first", get_dataset, "imagenet", kaggle, "val")
    csv_path.write_text("id,label\n")
    raises("expected the header ImageId,PredictionString", get_dataset, "imagenet", kaggle, "val")


def test_imagenet_devkit_without_scipy_says_what_to_do(tmp_path, monkeypatch):
    root = imagenet_replica.build_devkit(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "scipy.io", None)  # as if scipy were not installed
    msg = raises("needs scipy (pip install scipy)", get_dataset, "imagenet", root, "val")
    assert "valprep.sh" in msg


# ---------------------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_classes_file_with_real_names(tmp_path):
    for cls in ("c1", "c2"):
        jpg(tmp_path / "val" / cls / "a.jpg")
    (tmp_path / "classes.txt").write_text("c2 golden retriever\nc1\tgreat  white shark\nc9 tabby cat\n")
    ds = get_dataset("imagefolder", tmp_path, "val")
    assert ds.classes == ["golden retriever", "great white shark", "tabby cat"]
    assert [(r.id, r.label) for r in ds.images()] == [("c1/a", 1), ("c2/a", 0)]
    (tmp_path / "classes.txt").write_text("c2 dog\nc2 hound\n")
    raises("lists the folder 'c2' twice", get_dataset, "imagefolder", tmp_path, "val")
    (tmp_path / "classes.txt").write_text("c2\nc1\n")  # the plain form still works
    assert get_dataset("imagefolder", tmp_path, "val").classes == ["c2", "c1"]
    jpg(tmp_path / "test" / "sea lion" / "a.jpg")  # plain names with spaces, "sea otter" absent from this split
    (tmp_path / "classes.txt").write_text("sea otter\nsea lion\n")
    assert [r.label for r in get_dataset("imagefolder", tmp_path, "test").images()] == [1]


def test_imagefolder_wnid_folders_get_clip_names_and_templates(tmp_path):
    for wnid in ("n01443537", "n01440764"):
        jpg(tmp_path / "val" / wnid / "ILSVRC2012_val_00000001.JPEG")
    ds = get_dataset("imagefolder", tmp_path, "val")
    assert ds.classes == ["tench", "goldfish"] and len(ds.templates()) == 80
    assert "a photo of a n01440764." not in [t.format(c) for c in ds.classes for t in ds.templates()]
    jpg(tmp_path / "val" / "other" / "x.jpg")  # not all wnids: the folder names, the default templates
    other = get_dataset("imagefolder", tmp_path, "val")
    assert other.classes == ["n01440764", "n01443537", "other"] and len(other.templates()) == 8


def test_imagefolder_recursive_tiff_and_junk(tmp_path):
    split = tmp_path / "train"
    jpg(split / "cat" / "1.jpg")
    jpg(split / "cat" / "more" / "deeper" / "2.png", suffix_format="PNG")
    (split / "dog").mkdir()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(split / "dog" / "3.tif")
    Image.new("L", (8, 6), 9).save(split / "dog" / "4.TIFF")
    (split / "cat" / "._1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork companion
    (split / "cat" / ".hidden.jpg").write_bytes(b"junk")
    (split / "cat" / ".thumbs").mkdir()
    jpg(split / "cat" / ".thumbs" / "5.jpg")
    jpg(split / "__MACOSX" / "cat" / "._1.jpg")
    ds = get_dataset("imagefolder", tmp_path, "train")
    assert ds.classes == ["cat", "dog"]
    assert [(r.id, r.label) for r in ds.images()] == [
        ("cat/1", 0),
        ("cat/more/deeper/2", 0),
        ("dog/3", 1),
        ("dog/4", 1),
    ]
    assert ds.load_image(2).getpixel((0, 0)) == (1, 2, 3) and ds.load_image(3).getpixel((7, 5)) == (9, 9, 9)
    assert ds.load_image(1).size == (12, 10)


def test_imagefolder_root_at_the_split_folder(tmp_path):
    jpg(tmp_path / "val" / "cat" / "1.jpg")
    assert len(get_dataset("imagefolder", tmp_path / "val", "val")) == 1
    msg = raises("split folder not found", get_dataset, "imagefolder", tmp_path, "train")
    assert "<root>/train/<class>/<images>" in msg


# ------------------------------------------------------------------------------------- extract + eval, end to end


def test_stl10_extract_and_eval_classification(tmp_path, tiny_dinov2, tiny_bert, world_features, capsys):
    root, feats, run = replica("stl10", tmp_path / "data"), tmp_path / "features", tmp_path / "run"
    base = [
        "extract",
        "--dataset",
        "stl10",
        "--root",
        str(root),
        "--split",
        "test",
        "--features",
        str(feats),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    assert main([*base, "--encoder", f"hf:{tiny_dinov2}"]) == 0
    assert main([*base, "--encoder", f"hf:{tiny_bert}", "--text", "prompts"]) == 0
    prompts = next((feats / "stl10" / "test").glob("*.prompts.zarr"))
    attrs = zarr.open_group(str(prompts), mode="r").attrs
    assert list(attrs["classes"])[7] == "monkey" and list(attrs["templates"]) == [
        "a photo of a {}.",
        "a photo of the {}.",
    ]
    assert (
        main(
            [
                "align",
                "--shards",
                str(world_features / "world" / "train"),
                "--out",
                str(run),
                "--anchors",
                "8",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "classification",
                "--dataset",
                "stl10",
                "--root",
                str(root),
                "--split",
                "test",
                "--features",
                str(feats),
                "--run",
                str(run),
                "--device",
                "cpu",
                "--no-figures",
            ]
        )
        == 0
    )
    res = json.loads((run / "eval" / "classification-stl10-test.json").read_text())
    assert res["images"] == 12 and res["classes"] == 10 and 0.0 <= res["acc1"] <= res["acc5"] <= 1.0
