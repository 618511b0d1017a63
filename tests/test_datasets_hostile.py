"""Readers against files a user did not mean to give them: ground truth one line short, a MATLAB file of another
version, CIFAR pickles whose every global is allowed but whose content is hostile, and links that lead a reader's
files outside its dataset folder. Each is one line naming the file (exit 2 through the CLI), never a wrong result."""

from __future__ import annotations

import _codecs
import json
import os
import pickle
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipe_align.extract.datasets import get_dataset
from pipe_align.pipelines.cli import main
from tests.replicas import cifar as cifar_replica
from tests.replicas import imagenet as imagenet_replica
from tests.replicas import replica
from tests.test_datasets import raises

GT = Path("ILSVRC2012_devkit_t12") / "data" / "ILSVRC2012_validation_ground_truth.txt"


# ------------------------------------------------------------------------------------------- imagenet devkit


@pytest.mark.parametrize("lost", [5, 2], ids=["last-line", "middle-line"])
def test_imagenet_ground_truth_one_line_short_is_refused(tmp_path, lost):
    """Line i labels ILSVRC2012_val_<i>: without its last line the last image was dropped, without a middle line every
    later image took its neighbour's label. 6 images need 6 labels."""
    root = imagenet_replica.build_devkit(tmp_path / "d")
    lines = (root / GT).read_text().splitlines()
    del lines[lost]
    (root / GT).write_text("".join(f"{line}\n" for line in lines))
    msg = raises(f"{root / GT} has 5 labels but {root / 'val'} holds 6 images", get_dataset, "imagenet", root, "val")
    assert "must equal" in msg


def test_imagenet_ground_truth_for_fewer_images_than_the_folder_holds_is_refused(tmp_path, capsys):
    root = imagenet_replica.build_devkit(tmp_path / "d")
    shutil.copy(root / "val" / f"{imagenet_replica.stem(0)}.JPEG", root / "val" / f"{imagenet_replica.stem(6)}.JPEG")
    raises("has 6 labels but", get_dataset, "imagenet", root, "val")
    code = main(
        [
            "extract",
            "--dataset",
            "imagenet",
            "--root",
            str(root),
            "--split",
            "val",
            "--encoder",
            "dinov2-small",
            "--features",
            str(tmp_path / "f"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "has 6 labels but" in err
    assert not (tmp_path / "f").exists()


def matlab_v73_header() -> bytes:
    """The 128-byte header MATLAB writes before the HDF5 data of a v7.3 file: text, subsystem offset, version 0x0200
    and the endian indicator 'IM' (little-endian), then user block padding up to the HDF5 signature at byte 512."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 22:00:00 2026 HDF5 schema 1.00 ."
    head = text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM"
    return head.ljust(512, b"\0") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64


def test_imagenet_meta_mat_in_matlab_v73_says_what_it_is(tmp_path):
    root = imagenet_replica.build_devkit(tmp_path / "d")
    meta = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.write_bytes(matlab_v73_header())
    msg = raises(f"{meta} is a MATLAB v7.3 (HDF5) file", get_dataset, "imagenet", root, "val")
    assert "valprep.sh" in msg and "LOC_val_solution.csv" in msg


# ------------------------------------------------------------------------------------------------------- cifar


class Reduce:
    """Pickles as `func(*args)`: a REDUCE of a global the CIFAR reader allows."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_batches() -> dict[str, bytes]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]  # numpy's _reconstruct (numpy.core or numpy._core)
    rows = np.zeros((1, 3072), np.uint8)
    codec = pickle.dumps(
        {"labels": [1], "data": rows, "batch_label": Reduce(_codecs.encode, "x", "no-such-codec")}, protocol=2
    )
    huge = pickle.dumps({"labels": [1], "data": Reduce(reconstruct, np.ndarray, (4 * 10**12,), b"B")}, protocol=2)
    direct = pickle.dumps({"labels": [1], "data": Reduce(np.ndarray, (4 * 10**12,), np.dtype(np.uint8))}, protocol=2)
    # BINBYTES8 (protocol 4) whose length says 2**62 bytes follow: three do
    field = pickle.PROTO + b"\x04" + b"\x8e" + struct.pack("<Q", 2**62) + b"abc" + pickle.STOP
    label = pickle.dumps({"labels": [2**70], "data": rows}, protocol=2)
    return {
        "unknown codec": codec,
        "4e12-element array": huge,
        "ndarray(4e12)": direct,
        "2**62-byte field": field,
        "2**70 label": label,
    }


@pytest.mark.parametrize("case", list(hostile_batches()))
def test_cifar_pickle_with_allowed_names_and_hostile_content_is_one_line(tmp_path, case):
    root = replica("cifar10", tmp_path)
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(hostile_batches()[case])
    tracemalloc.start()
    try:
        msg = raises(str(batch), get_dataset, "cifar10", root, "test")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{case}: {peak} bytes allocated"  # numpy's allocations are traced too
    if case == "2**70 label":
        assert "label 1180591620717411303424 outside 0..9" in msg
    elif case == "unknown codec":
        assert "refused codec 'no-such-codec'" in msg


def test_cifar_stand_ins_read_every_pickle_form_numpy_writes(tmp_path):
    """The checked stand-ins of numpy's constructors give the same arrays as numpy for the python 2 batches of the
    replica and for python 3 pickles at protocols 2 to 5, big-endian and 2-D data included."""
    root = replica("cifar10", tmp_path)
    images, labels = cifar_replica.pixels("cifar10", "test")
    want = np.stack([images[:, :, :, c].reshape(len(images), 1024) for c in range(3)], axis=1).reshape(-1, 3072)
    batch = root / "cifar-10-batches-py" / "test_batch"
    for protocol in (2, 3, 4, 5):
        batch.write_bytes(
            pickle.dumps(
                {"data": want, "labels": labels.tolist(), "extra": np.arange(3, dtype=">i8")}, protocol=protocol
            )
        )
        ds = get_dataset("cifar10", root, "test")
        assert [r.label for r in ds.images()] == labels.tolist()
        assert all(np.array_equal(np.asarray(ds.load_image(i)), images[i]) for i in range(len(images)))
    from pipe_align.extract.datasets.cifar import _load

    extra = _load(batch)["extra"]
    assert extra.dtype == np.dtype(">i8") and extra.tolist() == [0, 1, 2]


def test_cifar_file_larger_than_any_batch_is_not_read(tmp_path, monkeypatch):
    from pipe_align.extract.datasets import cifar

    root = replica("cifar10", tmp_path)
    monkeypatch.setattr(cifar, "MAX_FILE_BYTES", 1000)
    batch = root / "cifar-10-batches-py" / "test_batch"
    raises(f"{batch} is {batch.stat().st_size} bytes, more than any CIFAR batch", get_dataset, "cifar10", root, "test")


# ------------------------------------------------------------------------------------------ links out of the root


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every dataset folder, written so that a reader following a link to it would succeed."""
    path = tmp_path / "private" / "notes.txt"
    path.parent.mkdir()
    path.write_text("c1 secret one\nc2 secret two\n")
    return path


def link(at: Path, to: Path) -> None:
    if at.exists() or at.is_symlink():
        at.unlink()
    at.symlink_to(to)


def test_imagefolder_classes_txt_linking_outside_the_root_is_refused(tmp_path, secret):
    root = tmp_path / "data"
    for cls in ("c1", "c2"):
        imagenet_replica._jpeg(root / "val" / cls / "a.JPEG", 0)
    link(root / "classes.txt", secret)
    raises(
        f"class list {root / 'classes.txt'} leads outside the dataset folder {root}",
        get_dataset,
        "imagefolder",
        root,
        "val",
    )
    (root / "classes.txt").unlink()  # a link that stays inside, and a root that is itself a link, are fine
    (root / "meta").mkdir()
    (root / "meta" / "names.txt").write_text("c1 first\nc2 second\n")
    link(root / "classes.txt", root / "meta" / "names.txt")
    os.symlink(root, tmp_path / "data-link")
    assert get_dataset("imagefolder", tmp_path / "data-link", "val").classes == ["first", "second"]


def test_voc_class_list_split_file_and_mask_links_are_refused(tmp_path, secret):
    root = replica("voc", tmp_path / "v")
    year = root / "VOCdevkit" / "VOC2012"
    link(year / "classes.txt", secret)
    raises("class list", get_dataset, "voc", root, "val")
    (year / "classes.txt").unlink()
    val = year / "ImageSets" / "Segmentation" / "val.txt"
    outside = tmp_path / "val.txt"
    shutil.copy(val, outside)
    link(val, outside)
    raises(f"split file {val} leads outside", get_dataset, "voc", root, "val")
    shutil.copy(outside, val.with_name("copy.txt"))
    link(val, val.with_name("copy.txt"))  # inside: fine
    ds = get_dataset("voc", root, "val")
    mask = year / "SegmentationClass" / f"{ds.images()[0].id}.png"
    moved = tmp_path / "mask.png"
    shutil.copy(mask, moved)
    link(mask, moved)
    raises(f"mask {mask} leads outside the dataset folder {mask.parent}", ds.load_mask, 0)
    # the mask folder itself may be a link (SegmentationClassAug is often linked in): its files are inside it
    aug = year / "SegmentationClassAug"
    shutil.move(aug, tmp_path / "aug")
    os.symlink(tmp_path / "aug", aug)
    assert get_dataset("voc", root, "trainaug").load_mask(0).ndim == 2


def test_ade20k_mask_link_is_refused(tmp_path):
    root = replica("ade20k", tmp_path / "a")
    ds = get_dataset("ade20k", root, "val")
    mask = ds.mask_dir / f"{ds.images()[0].id}.png"
    shutil.copy(mask, tmp_path / "m.png")
    link(mask, tmp_path / "m.png")
    raises("leads outside", ds.load_mask, 0)


def test_caption_files_linking_outside_are_refused_unless_named(tmp_path):
    root = replica("coco", tmp_path / "c")
    ann = root / "annotations" / "captions_val2014.json"
    shutil.copy(ann, tmp_path / "captions.json")
    link(ann, tmp_path / "captions.json")
    raises(f"captions file {ann} leads outside", get_dataset, "coco2014", root, "val")
    kp = root / "dataset_coco.json"
    shutil.copy(kp, tmp_path / "dataset_coco.json")
    link(kp, tmp_path / "dataset_coco.json")
    raises(f"split file {kp} leads outside", get_dataset, "coco-karpathy", root, "test")
    named = get_dataset("coco-karpathy", root, "test", json=str(tmp_path / "dataset_coco.json"))  # the user's file
    assert len(named) > 0


@pytest.mark.parametrize("filepath", ["../../elsewhere", "/etc"])
def test_karpathy_filepath_leading_out_of_the_image_folder_is_refused(tmp_path, filepath):
    root = replica("flickr30k", tmp_path / "f")
    data = json.loads((root / "dataset_flickr30k.json").read_text())
    entry = next(e for e in data["images"] if e["split"] == "test")
    entry["filepath"] = filepath
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    raises(
        f"filepath is {filepath!r}: it must be a path below the image folder", get_dataset, "flickr30k", root, "test"
    )


def test_classification_files_linking_outside_are_refused(tmp_path, secret):
    devkit = imagenet_replica.build_devkit(tmp_path / "d")
    shutil.copy(devkit / GT, tmp_path / "gt.txt")
    link(devkit / GT, tmp_path / "gt.txt")
    raises("ground truth file", get_dataset, "imagenet", devkit, "val")
    kaggle = imagenet_replica.build_kaggle(tmp_path / "k")
    shutil.copy(kaggle / "LOC_val_solution.csv", tmp_path / "sol.csv")
    link(kaggle / "LOC_val_solution.csv", tmp_path / "sol.csv")
    raises("Kaggle solution file", get_dataset, "imagenet", kaggle, "val")
    c10 = replica("cifar10", tmp_path / "c")
    meta = c10 / "cifar-10-batches-py" / "batches.meta"
    shutil.copy(meta, tmp_path / "batches.meta")
    link(meta, tmp_path / "batches.meta")
    raises(f"batch file {meta} leads outside", get_dataset, "cifar10", c10, "test")
    stl = replica("stl10", tmp_path / "s")
    link(stl / "stl10_binary" / "class_names.txt", secret)
    raises("class list", get_dataset, "stl10", stl, "test")
