"""Segmentation and caption readers on replicas of the real layouts (tests/replicas), wrong --root levels, the COCO
store paths, and the PAL authors' prompt set under `--protocol pal`."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipe_align.extract.datasets import dataset_class, get_dataset
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store
from pipe_align.pipelines.cli import main
from tests.helpers import one_line_error
from tests.replicas import replica
from tests.replicas.voc import write_jpg
from tests.test_datasets import raises


def file_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


# ------------------------------------------------------------------------------------------------- pascal-context


def test_pascal_context_60_and_59_as_mmsegmentation_defines_them(tmp_path):
    root = replica("pascal-context", tmp_path)
    year = root / "VOC2010"
    ds = get_dataset("pascal-context", root, "val")
    # mmseg's PascalContextDataset: background first, then the 59 names alphabetically
    assert len(ds.classes) == 60 and ds.classes[:4] == ["background", "aeroplane", "bag", "bed"]
    assert ds.classes[-1] == "wood" and ds.classes.index("pottedplant") == 40 and ds.classes.index("table") == 50
    assert [r.id for r in ds.images()] == sorted(
        year.joinpath("ImageSets/SegmentationContext/val.txt").read_text().split()
    )
    for i, rec in enumerate(ds.images()):
        mask = ds.load_mask(i)
        assert np.array_equal(mask, file_mask(year / "SegmentationClassContext" / f"{rec.id}.png"))
        img = ds.load_image(i)
        assert img.mode == "RGB" and img.size == (mask.shape[1], mask.shape[0])
    sixty, fifty_nine = dataset_class("pascal-context"), dataset_class("pascal-context-59")
    assert (sixty.background, sixty.reduce_zero_label, sixty.ignore_index) == (0, False, 255)
    assert (fifty_nine.background, fifty_nine.reduce_zero_label, fifty_nine.ignore_index) == (None, True, 255)
    assert get_dataset("pascal-context-59", root, "train").classes == ds.classes  # class index = mask value
    assert len(get_dataset("pascal-context", root, "train")) == 2


def test_pascal_context_root_levels_and_wrong_layouts(tmp_path):
    devkit = replica("pascal-context", tmp_path / "a")
    for root in (devkit.parent, devkit, devkit / "VOC2010"):
        assert len(get_dataset("pascal-context", root, "val")) == 3
    msg = raises(
        "expected the VOC layout (VOC2010: JPEGImages/ and ImageSets/SegmentationContext/)",
        get_dataset,
        "pascal-context",
        devkit / "VOC2010" / "JPEGImages",
        "val",
    )
    assert "VOCdevkit/VOC2010/" in msg
    raises("split 'test'", get_dataset, "pascal-context", devkit, "test")
    twice = tmp_path / "b"
    shutil.copytree(devkit, twice / "VOCdevkit")
    shutil.copytree(devkit / "VOC2010", twice / "VOC2010")
    raises("found in 2 places", get_dataset, "pascal-context", twice, "val")
    (devkit / "VOC2010" / "SegmentationClassContext" / "2008_000019.png").unlink()
    raises("'2008_000019' with no mask in", get_dataset, "pascal-context", devkit, "val")
    shutil.rmtree(devkit / "VOC2010" / "SegmentationClassContext")
    raises("mask folder not found", get_dataset, "pascal-context", devkit, "val")


# ------------------------------------------------------------------------------------- pascal-context-mat (PAL)

# The PAL authors' class list, in their order (shiwonkim/PAL_working, src/evaluation/zero_shot_segmentation.py:134-144).
AUTHORS_CONTEXT = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
    "bag",
    "bed",
    "bench",
    "book",
    "building",
    "cabinet",
    "ceiling",
    "cloth",
    "computer",
    "cup",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "keyboard",
    "light",
    "mountain",
    "mouse",
    "curtain",
    "platform",
    "sign",
    "plate",
    "road",
    "rock",
    "shelves",
    "sidewalk",
    "sky",
    "snow",
    "bedclothes",
    "track",
    "tree",
    "truck",
    "wall",
    "water",
    "window",
    "wood",
]


def authors_names(raw: np.ndarray, labels_txt: Path) -> np.ndarray:
    """The authors' mapping written out: a release label whose labels.txt name is one of their 59 names is that
    class, every other label (0 included) is background; as class names, so that the class order does not matter."""
    names = {int(k): v.strip() for k, v in (ln.split(":", 1) for ln in labels_txt.read_text().splitlines() if ln)}
    out = np.full(raw.shape, "background", dtype=object)
    for value in np.unique(raw):
        name = names.get(int(value))
        if name in AUTHORS_CONTEXT[1:]:
            out[raw == value] = name
    return out


def test_pascal_context_mat_maps_the_459_labels_as_the_pal_authors(tmp_path):
    from scipy.io import loadmat, savemat

    from tests.replicas.pascal_context_mat import CLASS_INDEX, IDS

    root = replica("pascal-context-mat", tmp_path)
    ds = get_dataset("pascal-context-mat", root, "trainval")
    assert [r.id for r in ds.images()] == sorted(IDS)  # every .mat of trainval/, not the image without one
    assert sorted(ds.classes) == sorted(AUTHORS_CONTEXT) and ds.classes[0] == "background"
    assert (type(ds).background, type(ds).reduce_zero_label) == (0, False)
    seen = set()
    for i, rec in enumerate(ds.images()):
        raw = loadmat(str(root / "trainval" / f"{rec.id}.mat"))["LabelMap"]
        mask = ds.load_mask(i)
        assert mask.dtype == np.uint8 and mask.shape == raw.shape and 255 not in mask
        assert ds.load_image(i).size == (raw.shape[1], raw.shape[0])
        got = np.array(ds.classes, dtype=object)[mask]
        assert (got == authors_names(raw, root / "labels.txt")).all(), rec.id
        seen |= set(got.ravel())
    assert "background" in seen and len(seen) > 3  # the replica exercises classes and other labels alike
    # every release label at once: the 59 at the indices of the real labels.txt, the other 400 and 0 to background
    every = np.arange(460, dtype=np.uint16).reshape(20, 23)
    savemat(str(root / "trainval" / f"{IDS[0]}.mat"), {"LabelMap": every})
    (root / "images" / f"{IDS[0]}.jpg").unlink()
    Image.new("RGB", (23, 20)).save(root / "images" / f"{IDS[0]}.jpg")
    got = np.array(ds.classes, dtype=object)[ds.load_mask(0)].ravel()
    expected = {index: name for name, index in CLASS_INDEX.items()}
    assert [got[v] for v in range(460)] == [expected.get(v, "background") for v in range(460)]


def test_pascal_context_mat_refuses_damaged_releases(tmp_path):
    from scipy.io import savemat

    root = replica("pascal-context-mat", tmp_path / "a")
    ds = get_dataset("pascal-context-mat", root, "trainval")
    mat = root / "trainval" / f"{ds.images()[1].id}.mat"
    h, w = ds.load_mask(1).shape
    savemat(str(mat), {"LabelMap": np.full((h, w), 460, np.uint16)})  # labels.txt lists 1..459
    raises(f"label map {mat} holds label 460, which {root / 'labels.txt'} does not list", ds.load_mask, 1)
    savemat(str(mat), {"Labels": np.zeros((h, w), np.uint16)})
    raises(f"label map {mat} has no LabelMap (variables: Labels)", ds.load_mask, 1)
    savemat(str(mat), {"LabelMap": np.zeros((h + 1, w), np.uint16)})
    raises(f"label map {mat} is {w}x{h + 1}, its image is {w}x{h}", ds.load_mask, 1)
    mat.write_bytes(b"not a mat file")
    raises(f"unreadable label map {mat}", ds.load_mask, 1)
    raises("has no split 'val' (choose from: trainval)", get_dataset, "pascal-context-mat", root, "val")
    labels = root / "labels.txt"
    text = labels.read_text()
    labels.write_text(text.replace("427: tvmonitor", "427: tv monitor"))
    raises(f"{labels} has no label named 'tvmonitor'", get_dataset, "pascal-context-mat", root, "trainval")
    labels.write_text(text.replace("2: aeroplane", "aeroplane"))
    raises(f"{labels}:2: expected '<index>: <name>'", get_dataset, "pascal-context-mat", root, "trainval")
    labels.write_text(text)
    (root / "images").unlink()
    raises("no images/ (or JPEGImages/) folder in", get_dataset, "pascal-context-mat", root, "trainval")
    (root / "images").symlink_to(tmp_path / "a" / "VOCdevkit" / "VOC2010" / "JPEGImages")
    (root / "images" / f"{ds.images()[0].id}.jpg").unlink()
    raises(
        f"{root / 'trainval' / (ds.images()[0].id + '.mat')} has no image",
        get_dataset,
        "pascal-context-mat",
        root,
        "trainval",
    )
    raises("no trainval/ folder of .mat label maps", get_dataset, "pascal-context-mat", root / "images", "trainval")


def test_pascal_context_mat_under_the_pal_protocol(tmp_path, world_features, tiny_dinov2, tiny_bert):
    """The PAL protocol on the .mat release: every pixel scored (no void), background competing, fg_mIoU."""
    run = tmp_path / "run"
    assert (
        main(
            [
                "align",
                "--method",
                "procrustes",
                "--shards",
                str(world_features / "world" / "train"),
                "--out",
                str(run),
                "--val-fraction",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    root = replica("pascal-context-mat", tmp_path / "data")
    feats = tmp_path / "features"
    common = ["--features", str(feats), "--root", str(root), "--split", "trainval", "--no-progress"]
    assert main(["extract", "--encoder", f"hf:{tiny_dinov2}", "--dataset", "pascal-context-mat", *common]) == 0
    assert (
        main(
            [
                "extract",
                "--encoder",
                f"hf:{tiny_bert}",
                "--dataset",
                "pascal-context-mat",
                "--text",
                "prompts",
                "--prompts",
                "pal",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "segmentation",
                "--run",
                str(run),
                "--dataset",
                "pascal-context-mat",
                "--split",
                "trainval",
                "--features",
                str(feats),
                "--root",
                str(root),
                "--protocol",
                "pal",
                "--no-figures",
            ]
        )
        == 0
    )
    res = json.loads((run / "eval" / "segmentation-pascal-context-mat-trainval-pal.json").read_text())
    ds = get_dataset("pascal-context-mat", root, "trainval")
    assert res["config"]["prompts"] == "pal" and res["num_classes"] == 60
    assert res["pixels"] == sum(ds.load_mask(i).size for i in range(len(ds))) and "fg_mIoU" in res


# ------------------------------------------------------------------------------------------------------------ voc


def test_voc_trainaug_reads_the_augmented_masks(tmp_path):
    root = replica("voc", tmp_path)
    year = root / "VOCdevkit" / "VOC2012"
    ds = get_dataset("voc", root, "trainaug")
    ids = year.joinpath("ImageSets/Segmentation/trainaug.txt").read_text().split()
    assert [r.id for r in ds.images()] == ids and ds.has_masks()
    for i, rid in enumerate(ids):
        aug = year / "SegmentationClassAug" / f"{rid}.png"
        with Image.open(aug) as img:
            assert img.mode == "L"  # grey index PNGs, unlike the official palette masks
        assert np.array_equal(ds.load_mask(i), file_mask(aug))
    official = get_dataset("voc", root, "train")
    with Image.open(year / "SegmentationClass" / f"{official.images()[0].id}.png") as img:
        assert img.mode == "P"
    assert (official.load_mask(0) == 255).any()  # object borders are void
    # mmseg's voc_aug.py converts SBD's masks only: a VOC-train id SBD lacks keeps its official mask
    first = ids[0]
    (year / "SegmentationClassAug" / f"{first}.png").unlink()
    mixed = get_dataset("voc", root, "trainaug")
    assert np.array_equal(mixed.load_mask(0), file_mask(year / "SegmentationClass" / f"{first}.png"))
    (year / "SegmentationClass" / f"{first}.png").unlink()
    raises(f"'{first}' with no mask in", get_dataset, "voc", root, "trainaug")
    shutil.rmtree(year / "SegmentationClassAug")
    raises("SegmentationClassAug", get_dataset, "voc", root, "trainaug")


def test_voc_test_split_has_images_and_no_masks(tmp_path):
    root = replica("voc", tmp_path)
    assert (root / "VOCdevkit" / "VOC2012" / "SegmentationClass").is_dir()
    ds = get_dataset("voc", root, "test")
    assert [r.id for r in ds.images()] == ["2008_000001", "2008_000004"] and not ds.has_masks()
    assert all(ds.load_image(i).mode == "RGB" for i in range(len(ds)))
    raises("test split has no public masks", ds.load_mask, 0)


def test_replica_jpegs_include_grayscale_and_cmyk(tmp_path):
    root = replica("voc", tmp_path)
    modes = set()
    for p in sorted((root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg")):
        with Image.open(p) as img:
            modes.add(img.mode)
    assert modes == {"RGB", "L", "CMYK"}
    ds = get_dataset("voc", root, "trainaug")
    assert {ds.load_image(i).mode for i in range(len(ds))} == {"RGB"}


# ---------------------------------------------------------------------------------------------- wrong root levels


def test_ade20k_nested_two_levels(tmp_path):
    src = replica("ade20k", tmp_path / "src") / "ADEChallengeData2016"
    nested = tmp_path / "n" / "ADEChallengeData2016" / "ADEChallengeData2016"  # unzipped into a folder of its name
    shutil.copytree(src, nested)
    mmseg = tmp_path / "data" / "ade" / "ADEChallengeData2016"  # mmseg's data/ given as --root
    shutil.copytree(src, mmseg)
    for root in (tmp_path / "n", tmp_path / "n" / "ADEChallengeData2016", nested, tmp_path / "data"):
        ds = get_dataset("ade20k", root, "val")
        assert [r.id for r in ds.images()] == [f"ADE_val_{k:08d}" for k in (1, 2, 3)]
    (tmp_path / "empty").mkdir()
    msg = raises(
        "expected ADEChallengeData2016's images/ and annotations/", get_dataset, "ade20k", tmp_path / "empty", "val"
    )
    assert "ADEChallengeData2016/ADEChallengeData2016/" in msg and "ade/ADEChallengeData2016/" in msg


def idx_files(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        pixels = np.arange(n * 28 * 28, dtype=np.uint32).astype(np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">iiii", 2051, n, 28, 28) + pixels.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">ii", 2049, n) + bytes([1, 2, 3][:n]))


def test_fashion_mnist_torchvision_raw_folder(tmp_path):
    idx_files(tmp_path / "FashionMNIST" / "raw")  # torchvision.datasets.FashionMNIST(root=tmp_path, download=True)
    for root in (tmp_path, tmp_path / "FashionMNIST", tmp_path / "FashionMNIST" / "raw"):
        ds = get_dataset("fashion-mnist", root, "test")
        assert [r.label for r in ds.images()] == [1, 2, 3]
    (tmp_path / "empty").mkdir()
    msg = raises(
        "expected t10k-images-idx3-ubyte.gz in --root", get_dataset, "fashion-mnist", tmp_path / "empty", "test"
    )
    assert "FashionMNIST/raw/" in msg


def karpathy(path: Path, images: list[dict]) -> None:
    """A Karpathy split file with the keys of the real one (sentids, imgid, tokens, cocoid: extra keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for j, e in enumerate(images):
        e.update(
            imgid=j,
            sentids=[2 * j, 2 * j + 1],
            sentences=[
                {"raw": f"A picture number {j}.", "tokens": ["a", "picture"], "imgid": j, "sentid": 2 * j},
                {"raw": f"Another caption {j}.", "tokens": ["another"], "imgid": j, "sentid": 2 * j + 1},
            ],
        )
    path.write_text(json.dumps({"images": images, "dataset": path.stem.split("_")[-1]}))


def test_flickr30k_kaggle_nested_images(tmp_path):
    kaggle = tmp_path / "flickr30k_images"
    for k, name in enumerate(["1000092795.jpg", "10002456.jpg"]):
        write_jpg(kaggle / "flickr30k_images" / name, k, (40, 30))
    (kaggle / "results.csv").write_text("image_name| comment_number| comment\n")
    karpathy(
        tmp_path / "dataset_flickr30k.json",
        [{"filename": "1000092795.jpg", "split": "test"}, {"filename": "10002456.jpg", "split": "train"}],
    )
    ds = get_dataset("flickr30k", tmp_path, "test")
    assert [r.id for r in ds.images()] == ["1000092795"] and ds.load_image(0).size == (40, 30)
    assert [c.text for c in ds.captions()] == ["A picture number 0.", "Another caption 0."]
    shutil.rmtree(kaggle)
    msg = raises("expected 1000092795.jpg", get_dataset, "flickr30k", tmp_path, "test")
    assert "flickr30k_images/flickr30k_images/" in msg


def coco_karpathy(root: Path, images_under: str) -> None:
    for k, (folder, name) in enumerate(
        [("val2014", "COCO_val2014_000000391895.jpg"), ("train2014", "COCO_train2014_000000057870.jpg")]
    ):
        write_jpg(root / images_under / folder / name, k, (40, 30))


def coco_entries() -> list[dict]:
    return [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "cocoid": 391895},
        {"filepath": "train2014", "filename": "COCO_train2014_000000057870.jpg", "split": "restval", "cocoid": 57870},
    ]


def test_coco_karpathy_lavis_images_folder_and_caption_datasets(tmp_path):
    """The LAVIS/BLIP layout: images/{train2014,val2014}; Karpathy's zip: caption_datasets/dataset_coco.json."""
    coco_karpathy(tmp_path, "images")
    karpathy(tmp_path / "caption_datasets" / "dataset_coco.json", coco_entries())
    for root in (tmp_path, tmp_path / "caption_datasets"):
        test = get_dataset("coco-karpathy", root, "test")
        assert [r.id for r in test.images()] == ["COCO_val2014_000000391895"] and test.load_image(0).mode == "RGB"
        assert [r.id for r in get_dataset("coco-karpathy", root, "train").images()] == ["COCO_train2014_000000057870"]
    coco_karpathy(tmp_path, ".")  # a second copy of the images directly under --root
    raises("found in 2 places", get_dataset, "coco-karpathy", tmp_path, "test")


# ----------------------------------------------------------------------------------------------------------- coco


def coco_year(root: Path, year: int, split: str = "val") -> None:
    name = f"{split}{year}"
    write_jpg(root / name / f"{year:012d}.jpg", year, (40, 30))
    doc = {
        "info": {"year": year},
        "licenses": [],
        "images": [{"id": year, "file_name": f"{year:012d}.jpg", "height": 30, "width": 40, "license": 1}],
        "annotations": [{"id": 7, "image_id": year, "caption": f"An image of {year}."}],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{name}.json").write_text(json.dumps(doc))


def test_coco_years_have_their_own_store_paths(tmp_path, tiny_bert):
    root = tmp_path / "coco"
    coco_year(root, 2014)
    coco_year(root, 2017)
    paths = {}
    for dataset, options in (("coco", (("year", 2014),)), ("coco", ()), ("coco2014", ()), ("coco2017", ())):
        feats = tmp_path / ("features" if dataset != "coco" else f"features-{dataset}-{len(options)}")
        cfg = ExtractConfig(
            encoder=f"hf:{tiny_bert}",
            dataset=dataset,
            split="val",
            features=str(feats),
            root=str(root),
            text="captions",
            options=options,
        )
        paths[(dataset, options)] = Path(run_extract(cfg, progress=False).path).relative_to(feats)
    # the two years in one --features folder side by side; `coco` goes where the year's name goes
    assert paths[("coco", (("year", 2014),))] == paths[("coco2014", ())]
    assert paths[("coco", ())] == paths[("coco2017", ())] != paths[("coco2014", ())]
    feats = tmp_path / "features"
    for year in (2014, 2017):
        st = open_store(feats / f"coco{year}" / "val" / f"hf-{tiny_bert.replace('/', '--').strip('.')}.zarr")
        assert st.layout.dataset == f"coco{year}" and list(st.read("text")) == [f"An image of {year}."]
    raises("contradicts the name", get_dataset, "coco2014", root, "val", year=2017)


# -------------------------------------------------------------------------------------------------- pal prompts


def prompt_texts(store) -> list[str]:
    return [str(t) for t in store.read("text")]


def extract_prompts(encoder: str, dataset: str, root: Path, feats: Path, prompts: str):
    cfg = ExtractConfig(
        encoder=encoder,
        dataset=dataset,
        split="val",
        features=str(feats),
        root=str(root),
        text="prompts",
        prompts=prompts,
        max_length=16,
    )
    return open_store(run_extract(cfg, progress=False).path)


def test_pal_prompts_use_the_authors_names_and_templates(tmp_path, tiny_bert):
    """Written down from shiwonkim/PAL_working (src/evaluation/zero_shot_segmentation.py and zero_shot_metadata.py,
    the `ensemble` strategy), independently of this tool's tables: a few of their names and templates."""
    enc, feats = f"hf:{tiny_bert}", tmp_path / "features"
    voc = replica("voc", tmp_path / "voc")
    pal = extract_prompts(enc, "voc", voc, feats, "pal")
    std = extract_prompts(enc, "voc", voc, feats, "standard")
    assert pal.path.name.endswith(".pal.prompts.zarr") and std.path.name.endswith(".prompts.zarr")
    assert pal.path != std.path and pal.layout.prompts == "pal" and std.layout.prompts is None
    texts = prompt_texts(pal)
    assert len(pal.layout.templates) == 80 and len(texts) == 21 * 80
    for sentence in (
        "a bad photo of a dining table.",
        "a photo of many potted plant.",
        "itap of my tv monitor.",
        "a tattoo of the aeroplane.",
        "the origami background.",
    ):
        assert sentence in texts, sentence
    assert not any("diningtable" in t for t in texts)
    assert list(pal.layout.classes)[11] == "diningtable" and pal.layout.prompt_names[11] == "dining table"
    std_texts = prompt_texts(std)
    assert "a photo of a diningtable." in std_texts and len(std_texts) == 21 * 8
    pc = extract_prompts(enc, "pascal-context", replica("pascal-context", tmp_path / "pc"), feats, "pal")
    assert "a photo of a potted plant." in prompt_texts(pc) and "a photo of a bedclothes." in prompt_texts(pc)
    ade = extract_prompts(enc, "ade20k", replica("ade20k", tmp_path / "ade"), feats, "pal")
    assert "a photo of a background." in prompt_texts(ade) and "a photo of a chest of drawers." in prompt_texts(ade)
    assert not any(" other." in t for t in prompt_texts(ade))


def test_pal_prompts_refused_where_the_authors_wrote_none(tmp_path, tiny_bert, capsys):
    base = ["extract", "--features", str(tmp_path / "f"), "--no-progress", "--split", "val"]
    code = main(
        [
            *base,
            "--encoder",
            f"hf:{tiny_bert}",
            "--dataset",
            "world",
            "-o",
            "size=4",
            "--text",
            "prompts",
            "--prompts",
            "pal",
        ]
    )
    one_line_error(capsys, code, "--prompts pal", "world")
    voc = replica("voc", tmp_path / "voc")
    (voc / "VOCdevkit" / "VOC2012" / "classes.txt").write_text("background\nball\n")  # not PASCAL VOC's classes
    code = main(
        [
            *base,
            "--encoder",
            f"hf:{tiny_bert}",
            "--dataset",
            "voc",
            "--root",
            str(voc),
            "--text",
            "prompts",
            "--prompts",
            "pal",
        ]
    )
    one_line_error(capsys, code, "--prompts pal", "voc")
    code = main(
        [
            *base,
            "--encoder",
            f"hf:{tiny_bert}",
            "--dataset",
            "voc",
            "--root",
            str(voc),
            "--text",
            "prompts",
            "--prompts",
            "pal",
            "--templates",
            "a {}.",
        ]
    )
    one_line_error(capsys, code, "--templates")
    code = main([*base, "--encoder", f"hf:{tiny_bert}", "--dataset", "voc", "--root", str(voc), "--prompts", "mine"])
    one_line_error(capsys, code, "--prompts must be one of standard, pal")


# ------------------------------------------------------------------------------------ end to end: pascal-context


@pytest.fixture
def pc_env(tmp_path, world_features, tiny_dinov2, tiny_bert):
    """A procrustes run on the world stores, and pascal-context val image stores of the same tiny encoders."""
    run = tmp_path / "run"
    assert (
        main(
            [
                "align",
                "--method",
                "procrustes",
                "--shards",
                str(world_features / "world" / "train"),
                "--out",
                str(run),
                "--val-fraction",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    root = replica("pascal-context", tmp_path / "data")
    feats = tmp_path / "features"
    common = ["--features", str(feats), "--root", str(root), "--split", "val", "--no-progress"]
    for dataset in ("pascal-context", "pascal-context-59"):
        assert main(["extract", "--encoder", f"hf:{tiny_dinov2}", "--dataset", dataset, *common]) == 0
        assert (
            main(["extract", "--encoder", f"hf:{tiny_bert}", "--dataset", dataset, "--text", "prompts", *common]) == 0
        )
    return {"run": run, "root": root, "feats": feats, "common": common}


def seg(env, dataset: str, protocol: str) -> list[str]:
    return [
        "eval",
        "segmentation",
        "--run",
        str(env["run"]),
        "--dataset",
        dataset,
        "--split",
        "val",
        "--features",
        str(env["feats"]),
        "--root",
        str(env["root"]),
        "--protocol",
        protocol,
        "--no-figures",
    ]


def result(env, dataset: str, protocol: str) -> dict:
    return json.loads((env["run"] / "eval" / f"segmentation-{dataset}-val-{protocol}.json").read_text())


def test_pascal_context_segmentation_under_both_protocols(pc_env, tiny_bert, capsys):
    env = pc_env
    assert main(seg(env, "pascal-context", "standard")) == 0
    res = result(env, "pascal-context", "standard")
    assert res["config"]["prompts"] == "standard" and res["num_classes"] == 60 and "iou/pottedplant" in res
    masks = [get_dataset("pascal-context", env["root"], "val").load_mask(i) for i in range(3)]
    assert res["pixels"] == sum(m.size for m in masks)  # mmseg's converted masks have no void pixel
    res59 = (main(seg(env, "pascal-context-59", "standard")), result(env, "pascal-context-59", "standard"))[1]
    assert res59["num_classes"] == 59 and res59["pixels"] == sum(int((m != 0).sum()) for m in masks)
    assert "iou/background" not in res59 and "fg_mIoU" not in res59
    code = main(seg(env, "pascal-context", "pal"))  # no pal prompt store: no fallback to the standard prompts
    err = one_line_error(capsys, code, "no pal class-prompt store", ".pal.prompts.zarr", "--prompts pal")
    command = err.split("create it with: ", 1)[1].strip().split()
    pal_path = Path(err.split("no pal class-prompt store at ", 1)[1].split(";")[0])
    shutil.copytree(pal_path.with_name(pal_path.name.replace(".pal.prompts", ".prompts")), pal_path)  # a renamed copy
    one_line_error(capsys, main(seg(env, "pascal-context", "pal")), "holds the standard prompt set, not pal")
    shutil.rmtree(pal_path)
    assert main(command[1:] + ["--no-progress"]) == 0  # the command it names writes the store it needs
    capsys.readouterr()
    assert main(seg(env, "pascal-context", "pal")) == 0
    res = result(env, "pascal-context", "pal")
    assert res["config"]["prompts"] == "pal" and res["config"]["text_store"].endswith(".pal.prompts.zarr")
    assert res["pixels"] == sum(m.size for m in masks) and "fg_mIoU" in res and "iou/pottedplant" in res


def test_voc_test_split_is_refused_for_segmentation(pc_env, tiny_dinov2, tiny_bert, tmp_path, capsys):
    env = pc_env
    voc = replica("voc", tmp_path / "voc")
    common = ["--features", str(env["feats"]), "--root", str(voc), "--split", "test", "--no-progress"]
    assert main(["extract", "--encoder", f"hf:{tiny_dinov2}", "--dataset", "voc", *common]) == 0
    assert main(["extract", "--encoder", f"hf:{tiny_bert}", "--dataset", "voc", "--text", "prompts", *common]) == 0
    code = main(
        [
            "eval",
            "segmentation",
            "--run",
            str(env["run"]),
            "--dataset",
            "voc",
            "--split",
            "test",
            "--features",
            str(env["feats"]),
            "--root",
            str(voc),
            "--protocol",
            "standard",
            "--no-figures",
        ]
    )
    one_line_error(capsys, code, "has no segmentation masks")


def test_pal_protocol_on_a_set_the_authors_never_evaluated_says_so(pc_env, world_features, capsys):
    """The world has no pal prompt set: --protocol pal scores with its standard prompts, noted and recorded."""
    run = pc_env["run"]
    code = main(
        [
            "eval",
            "segmentation",
            "--run",
            str(run),
            "--dataset",
            "world",
            "--split",
            "val",
            "--features",
            str(world_features),
            "-o",
            "size=8",
            "--protocol",
            "pal",
            "--no-figures",
        ]
    )
    assert code == 0
    assert "wrote no prompts for world" in capsys.readouterr().err
    res = json.loads((run / "eval" / "segmentation-world-val-pal.json").read_text())
    assert res["config"]["prompts"] == "standard" and res["config"]["text_store"].endswith("bert.prompts.zarr")


def test_eval_finds_coco_stores_under_the_years_name(pc_env, tiny_dinov2, tiny_bert, tmp_path, capsys):
    root, feats, run = tmp_path / "coco", pc_env["feats"], pc_env["run"]
    coco_year(root, 2017)
    coco_year(root, 2014)
    common = ["--features", str(feats), "--root", str(root), "--split", "val", "--no-progress"]
    for dataset in ("coco", "coco2014"):
        assert main(["extract", "--encoder", f"hf:{tiny_dinov2}", "--dataset", dataset, *common]) == 0
        assert (
            main(["extract", "--encoder", f"hf:{tiny_bert}", "--dataset", dataset, "--text", "captions", *common]) == 0
        )
    assert not (feats / "coco").exists() and (feats / "coco2017" / "val").is_dir()

    def retrieval(dataset: str) -> int:
        return main(
            [
                "eval",
                "retrieval",
                "--run",
                str(run),
                "--dataset",
                dataset,
                "--split",
                "val",
                "--features",
                str(feats),
                "--no-figures",
            ]
        )

    assert retrieval("coco") == 2  # both years' stores exist: the name must say which
    one_line_error(capsys, 2, "coco2014", "coco2017", "--dataset")
    for dataset in ("coco2014", "coco2017"):
        assert retrieval(dataset) == 0
        res = json.loads((run / "eval" / f"retrieval-{dataset}-val.json").read_text())
        assert f"/{dataset}/val/" in res["config"]["image_store"]
    shutil.rmtree(feats / "coco2014")
    assert retrieval("coco") == 0
    res = json.loads((run / "eval" / "retrieval-coco-val.json").read_text())
    assert "/coco2017/val/" in res["config"]["image_store"] and res["images"] == 1
