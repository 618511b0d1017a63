"""Readers of users' own image-caption pairs: csv/tsv/jsonl tables, imagefolder metadata, WebDataset shards, parquet.
Fixtures are written in each format's real layout (tests/pairs_files.py); bad input is one line naming its place."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipe_align.extract.datasets import UnreadableImage, get_dataset
from pipe_align.extract.datasets.pairs import expand_braces, source_files
from pipe_align.extract.datasets.webdataset import WebDataset
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store
from pipe_align.pipelines.cli import main
from tests.pairs_files import (
    Pair,
    make_pairs,
    tar_member,
    write_all,
    write_csv,
    write_imagefolder,
    write_parquet,
    write_webdataset,
)
from tests.test_datasets import raises

pq = pytest.importorskip("pyarrow.parquet")  # in the dev extra; the missing-extra message is tested below
import pyarrow as pa  # noqa: E402


def pixels(ds, i: int) -> np.ndarray:
    return np.asarray(ds.load_image(i))


def decoded(p: Pair) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(p.data)).convert("RGB"))


def by_image(ds) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in ds.images()]
    for c in ds.captions():
        out[c.item].append(c.text)
    return out


# ------------------------------------------------------------------------------------------------ brace ranges


BRACES = [
    "shard-{00000..00003}.tar",
    "{a,b}{1..3}",
    "x{1..10}y",
    "{09..11}",
    "p{a,{b,c}d}q",
    "{3..1}",
    "{a,}z",
    "{-2..2}",
    "s{0..1}/{000..002}.tar",
    "plain.tar",
]


@pytest.mark.parametrize("pattern", BRACES)
def test_brace_expansion_is_bash_s(pattern):
    """bash defines brace expansion: the function must list what bash lists, in bash's order."""
    if shutil.which("bash") is None:
        pytest.skip("bash is the reference")
    ref = subprocess.run(["bash", "-c", f"printf '%s\\n' {pattern}"], capture_output=True, text=True, check=True)
    assert expand_braces(pattern) == ref.stdout.splitlines()


def test_brace_expansion_written_out_and_bad_patterns():
    assert expand_braces("{00000..00002}.tar") == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]  # no leading zero: no padding
    assert expand_braces("{a,b}-{1,2}") == ["a-1", "a-2", "b-1", "b-2"]
    for bad, needle in (("a{1..3", "unbalanced '{'"), ("a}b", "unbalanced '}'"), ("{x}.tar", "no ',' or '..'")):
        raises(needle, expand_braces, bad)


def test_source_files_folder_glob_brace_and_missing(tmp_path):
    for n in range(3):
        (tmp_path / f"{n:03d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(source_files("webdataset", tmp_path, (".tar",), "shards")) == ["000.tar", "001.tar", "002.tar"]
    assert names(source_files("webdataset", f"{tmp_path}/*.tar", (".tar",), "shards")) == [
        "000.tar",
        "001.tar",
        "002.tar",
    ]
    assert names(source_files("webdataset", f"{tmp_path}/{{002..000}}.tar", (".tar",), "x")) == [
        "002.tar",
        "001.tar",
        "000.tar",
    ]
    raises("003.tar (from --root", source_files, "webdataset", f"{tmp_path}/{{000..003}}.tar", (".tar",), "x")
    raises("no file matches", source_files, "webdataset", f"{tmp_path}/*.tgz", (".tar",), "x")
    (tmp_path / "empty").mkdir()
    raises("no tar shards (.tar) in", source_files, "webdataset", tmp_path / "empty", (".tar",), "tar shards")
    raises("only local paths", source_files, "parquet", "s3://bucket/x.parquet", (".parquet",), "x")


# ----------------------------------------------------------------------------------------------------- csv


def test_csv_open_clip_columns_groups_rows_and_resolves_paths(tmp_path, monkeypatch):
    pairs = make_pairs(5)
    table = write_csv(tmp_path / "data", pairs)
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the table's folder, not the working directory
    ds = get_dataset("csv", table, "train")
    assert [r.id for r in ds.images()] == [p.key for p in pairs]
    assert by_image(ds) == [list(p.captions) for p in pairs]
    assert [c.id for c in ds.captions()][:3] == ["000000#0", "000001#0", "000001#1"]
    for i, p in enumerate(pairs):
        np.testing.assert_array_equal(pixels(ds, i), decoded(p))
    assert [r.id for r in get_dataset("csv", table.parent, "anything").images()] == [p.key for p in pairs]


def test_csv_tab_separated_tsv_jsonl_and_options(tmp_path):
    pairs = make_pairs(4)
    tab = write_csv(tmp_path / "tab", pairs, sep="\t")  # open_clip's default separator, in a .csv file
    assert by_image(get_dataset("csv", tab, "train")) == [list(p.captions) for p in pairs]
    tsv = tab.with_suffix(".tsv")
    tsv.write_text(tab.read_text().replace("filepath", "img").replace("title", "caption"))
    ds = get_dataset("csv", tsv, "train", image_key="img", caption_key="caption")
    assert by_image(ds) == [list(p.captions) for p in pairs]
    semi = tmp_path / "tab" / "semi.txt"
    semi.write_text(tab.read_text().replace("\t", ";"))
    assert len(get_dataset("csv", semi, "train", separator=";").images()) == 4
    assert len(get_dataset("csv", tab, "train", separator="\\t").images()) == 4  # what a shell passes for -o sep=\t
    jl = tmp_path / "tab" / "pairs.jsonl"  # a list of captions in one cell is several captions
    jl.write_text(
        "".join(json.dumps({"filepath": f"{p.key}{p.suffix}", "title": list(p.captions)}) + "\n" for p in pairs)
    )
    assert by_image(get_dataset("csv", jl, "train")) == [list(p.captions) for p in pairs]
    raises("option separator='ab' must be one character", get_dataset, "csv", tab, "train", separator="ab")


def test_csv_split_column_selects_rows(tmp_path):
    pairs = make_pairs(6)
    table = write_csv(tmp_path, pairs)
    lines = table.read_text().splitlines()
    split_of = {p.key: ("test" if i % 3 == 2 else "train") for i, p in enumerate(pairs)}
    rows = [lines[0] + ",split"] + [f"{ln},{split_of[ln.split('.')[0]]}" for ln in lines[1:]]
    table.write_text("\n".join(rows) + "\n")
    test = get_dataset("csv", table, "test")
    assert [r.id for r in test.images()] == [p.key for p in pairs if split_of[p.key] == "test"]
    assert by_image(test) == [list(p.captions) for p in pairs if split_of[p.key] == "test"]
    assert len(get_dataset("csv", table, "train").images()) == 4
    raises("no rows of split 'val'", get_dataset, "csv", table, "val")
    assert "holds: train, test" in raises("split 'val'", get_dataset, "csv", table, "val")


def test_csv_bad_input_names_file_and_line(tmp_path):
    pairs = make_pairs(3)
    table = write_csv(tmp_path, pairs)
    text = table.read_text()
    msg = raises("has no column 'caption'", get_dataset, "csv", table, "train", caption_key="caption")
    assert "columns: filepath, title" in msg and "-o caption_key=" in msg
    table.write_text(text.replace(pairs[1].captions[0], "  "))
    raises(f"empty caption in {table} line 3", get_dataset, "csv", table, "train")
    table.write_text(text.rstrip("\n") + "\n000001.jpg,a caption,extra\n")
    raises(f"{table} line {len(text.splitlines()) + 1} has 3 fields, the header has 2", get_dataset, "csv", table, "x")
    table.write_bytes(text.encode() + b"000001.jpg,caf\xe9\n")
    raises(f"{table} is not UTF-8 text (line {len(text.splitlines()) + 1}", get_dataset, "csv", table, "train")
    table.write_text(text + ",a caption without image\n")
    raises("the image path ('filepath') is empty", get_dataset, "csv", table, "train")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"filepath": "000000.png", "title": "ok"}\n{"filepath": "000001.jpg", "title": "no end"\n')
    raises(f"malformed JSON in {jl} line 2", get_dataset, "csv", jl, "train")
    jl.write_text('{"filepath": "000000.png", "title": "ok"}\n{"filepath": "000001.jpg"}\n')
    raises(f"{jl} line 2 has no 'title' (keys: filepath)", get_dataset, "csv", jl, "train")
    jl.write_text('{"filepath": "000000.png", "title": 42}\n')
    raises("caption must be a string, got 42", get_dataset, "csv", jl, "train")
    raises("2 (p.jsonl, pairs.csv)", get_dataset, "csv", tmp_path, "train")  # a folder with two tables


def test_csv_missing_image_is_unreadable_not_fatal(tmp_path):
    pairs = make_pairs(3)
    table = write_csv(tmp_path, pairs)
    (tmp_path / f"{pairs[1].key}{pairs[1].suffix}").unlink()
    ds = get_dataset("csv", table, "train")
    assert len(ds.images()) == 3
    with pytest.raises(UnreadableImage, match=pairs[1].key):
        ds.load_image(1)


def test_csv_same_id_for_two_files_is_refused(tmp_path):
    pairs = make_pairs(2)
    table = write_csv(tmp_path, pairs)
    shutil.copy(tmp_path / "000000.png", tmp_path / "000000.jpg")
    table.write_text(table.read_text() + "000000.jpg,another file\n")
    raises("different images with the same id '000000'", get_dataset, "csv", table, "train")


# ------------------------------------------------------------------------------------------ imagefolder metadata


def test_imagefolder_metadata_jsonl_and_csv(tmp_path):
    pairs = make_pairs(4)
    root = write_imagefolder(tmp_path / "jsonl", pairs, split="train")
    ds = get_dataset("imagefolder", root, "train")
    assert ds.classes is None and not ds.labelled and ds.templates() == []
    assert [r.id for r in ds.images()] == [p.key for p in pairs]
    assert by_image(ds) == [list(p.captions) for p in pairs]
    np.testing.assert_array_equal(pixels(ds, 0), decoded(pairs[0]))
    assert [r.id for r in get_dataset("imagefolder", root / "train", "train").images()] == [p.key for p in pairs]
    meta = root / "train" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"text"', '"caption"'))
    raises("has no column 'text' (columns: file_name, caption)", get_dataset, "imagefolder", root, "train")
    assert len(get_dataset("imagefolder", root, "train", caption_key="caption").images()) == 4
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    with open(root / "train" / "metadata.csv", "w", newline="") as f:
        f.write("file_name,caption\n" + "".join(f'{r["file_name"]},"{r["caption"]}"\n' for r in rows))
    raises("both", get_dataset, "imagefolder", root, "train")
    meta.unlink()
    ds = get_dataset("imagefolder", root, "train", caption_key="caption")
    assert by_image(ds) == [list(p.captions) for p in pairs]


def test_imagefolder_without_metadata_keeps_classes(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / cls / "a.png")
    ds = get_dataset("imagefolder", tmp_path, "val")
    assert ds.classes == ["cat", "dog"] and ds.captions() is None and ds.labelled
    raises(
        "option caption_key applies to a split folder with metadata.jsonl",
        get_dataset,
        "imagefolder",
        tmp_path,
        "val",
        caption_key="text",
    )


# ----------------------------------------------------------------------------------------------- webdataset


def test_webdataset_samples_captions_and_image_choice(tmp_path):
    pairs = make_pairs(5)
    write_webdataset(tmp_path, pairs, shards=2)
    ds = get_dataset("webdataset", f"{tmp_path}/{{00000..00001}}.tar", "train")
    assert [r.id for r in ds.images()] == [p.key for p in pairs]
    assert by_image(ds) == [[p.captions[0]] for p in pairs]  # .txt: one caption each
    ds = get_dataset("webdataset", tmp_path, "train", json_key="captions")  # the folder, and the json's list
    assert by_image(ds) == [list(p.captions) for p in pairs]
    for i, p in enumerate(pairs):
        np.testing.assert_array_equal(pixels(ds, i), decoded(p))
    with tarfile.open(tmp_path / "00002.tar", "w") as tar:  # two image members: image_key's order decides
        tar_member(tar, "k.png", pairs[0].data)
        tar_member(tar, "k.jpg", pairs[1].data)
        tar_member(tar, "k.txt", b"two images")
    one = get_dataset("webdataset", tmp_path / "00002.tar", "train")
    np.testing.assert_array_equal(pixels(one, 0), decoded(pairs[1]))
    one = get_dataset("webdataset", tmp_path / "00002.tar", "train", image_key="png;jpg")
    np.testing.assert_array_equal(pixels(one, 0), decoded(pairs[0]))


def test_webdataset_sample_without_image_or_caption_is_listed(tmp_path):
    pairs = make_pairs(3)
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        tar_member(tar, "dir/k1.jpg", pairs[1].data)
        tar_member(tar, "dir/k1.txt", b"has both")
        tar_member(tar, "dir/k2.txt", b"no image")
        tar_member(tar, "dir/k3.jpg", pairs[1].data)
        tar_member(tar, "dir/k3.json", b'{"other": 1}')
    ds = get_dataset("webdataset", path, "train")
    assert [r.id for r in ds.images()] == ["dir/k1", "dir/k2", "dir/k3"]
    assert [(c.id, c.item) for c in ds.captions()] == [("dir/k1#0", 0), ("dir/k2#0", 1)]
    ds.load_image(0)
    with pytest.raises(UnreadableImage, match="sample dir/k2 has no image"):
        ds.load_image(1)
    with pytest.raises(UnreadableImage, match=r"sample dir/k3 has no caption \(.txt\)"):
        ds.load_image(2)


def test_webdataset_damaged_shards_are_one_line(tmp_path):
    pairs = make_pairs(4)
    good = write_webdataset(tmp_path / "good", pairs, shards=1)[0]
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        members = tar.getmembers()
    cut = tmp_path / "cut.tar"  # cut inside an image's data: tarfile itself would stop silently there
    cut.write_bytes(data[: members[3].offset_data + 10])
    msg = raises(f"damaged tar {cut}: ", get_dataset, "webdataset", cut, "train")
    assert f"at byte {members[4].offset}" in msg  # where the next member should have begun
    cut.write_bytes(data[: members[2].offset_data + 10])  # inside a caption member (.json), which is read
    raises(
        f"damaged tar {cut}: member 000000.json (at byte {members[2].offset}) is cut short",
        get_dataset,
        "webdataset",
        cut,
        "train",
        json_key="captions",
    )
    cut.write_bytes(data[: members[3].offset])  # cut on a member boundary
    raises(f"damaged tar {cut}: truncated at byte {members[3].offset}", get_dataset, "webdataset", cut, "train")
    bad = bytearray(data)  # a header overwritten in the middle
    bad[members[3].offset : members[3].offset + 100] = b"x" * 100
    cut.write_bytes(bytes(bad))
    raises(
        f"damaged tar {cut}: unreadable member header at byte {members[3].offset}",
        get_dataset,
        "webdataset",
        cut,
        "train",
    )
    cut.write_bytes(b"not a tar at all" * 100)
    raises(f"damaged tar {cut}", get_dataset, "webdataset", cut, "train")
    import gzip

    cut.write_bytes(gzip.compress(data))
    raises("gzip-compressed tar", get_dataset, "webdataset", cut, "train")
    with tarfile.open(cut, "w") as tar:
        tar_member(tar, "k.jpg", pairs[1].data)
        tar_member(tar, "k.txt", b"caf\xe9")
    raises(f"{cut} member k.txt (at byte", get_dataset, "webdataset", cut, "train")
    with tarfile.open(cut, "w") as tar:
        tar_member(tar, "k.jpg", pairs[1].data)
        tar_member(tar, "k.txt", b" \t")
    raises(f"empty caption in {cut} member k.txt", get_dataset, "webdataset", cut, "train")
    shutil.copy(good, tmp_path / "good" / "00001.tar")  # the same keys in two shards
    raises("sample key '000000' is in two shards", get_dataset, "webdataset", tmp_path / "good", "train")


def test_webdataset_corrupt_image_is_unreadable_a_cut_shard_is_fatal(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        tar_member(tar, "k.jpg", b"\xff\xd8 not really a jpeg")
        tar_member(tar, "k.txt", b"a caption")
    with pytest.raises(UnreadableImage, match="k.jpg"):
        get_dataset("webdataset", path, "train").load_image(0)
    pairs = make_pairs(2)
    write_webdataset(tmp_path / "w", pairs, shards=1)
    shard = tmp_path / "w" / "00000.tar"
    ds = get_dataset("webdataset", shard, "train")
    shard.write_bytes(shard.read_bytes()[:2048])  # cut after listing: the shard's problem, not one image's
    with pytest.raises(PipeError, match=f"{shard} is shorter than when it was listed") as info:
        ds.load_image(1)
    assert not isinstance(info.value, UnreadableImage)


# --------------------------------------------------------------------------------------------------- parquet


def test_parquet_struct_rows_and_id_key(tmp_path):
    pairs = make_pairs(5)
    write_parquet(tmp_path, pairs, files=2, row_group_size=2)
    ds = get_dataset("parquet", tmp_path, "train", id_key="key")
    assert [r.id for r in ds.images()] == [p.key for p in pairs]
    assert by_image(ds) == [list(p.captions) for p in pairs]
    for i, p in enumerate(pairs):
        np.testing.assert_array_equal(pixels(ds, i), decoded(p))
    rows = get_dataset("parquet", tmp_path, "train")  # without id_key: one image per row, id = file stem / row
    n0 = sum(len(p.captions) for p in pairs[:3])
    assert [r.id for r in rows.images()][:2] == ["train-00000-of-00002/0", "train-00000-of-00002/1"]
    assert rows.images()[n0].id == "train-00001-of-00002/0" and len(rows.images()) == sum(
        len(p.captions) for p in pairs
    )


def test_parquet_binary_column_list_captions_and_bounded_row_groups(tmp_path, monkeypatch):
    pairs = make_pairs(7)
    table = pa.table({"jpg": [p.data for p in pairs], "captions": [list(p.captions) for p in pairs]})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    ds = get_dataset("parquet", tmp_path / "x.parquet", "train", image_key="jpg", caption_key="captions")
    assert by_image(ds) == [list(p.captions) for p in pairs]
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, g, **kw: reads.append(g) or original(self, g, **kw)
    )
    for i, p in enumerate(pairs):
        np.testing.assert_array_equal(pixels(ds, i), decoded(p))
        assert len(ds._cache) <= 2  # memory: at most two row groups of images
    assert reads == [0, 1, 2, 3]  # each row group read once when rows are read in order
    clone = pickle.loads(pickle.dumps(ds))  # dask workers get a copy: the cache and lock are rebuilt
    np.testing.assert_array_equal(pixels(clone, 6), decoded(pairs[6]))


def test_parquet_bad_input(tmp_path, monkeypatch):
    pairs = make_pairs(3)
    path = write_parquet(tmp_path, pairs, files=1)[0]
    msg = raises("has no column 'caption'", get_dataset, "parquet", path, "train", caption_key="caption")
    assert "columns: image, text, key" in msg
    raises("column 'text' is string, not image bytes", get_dataset, "parquet", path, "train", image_key="text")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises(f"damaged parquet file {path}", get_dataset, "parquet", path, "train")
    pq.write_table(pa.table({"image": [pairs[0].data], "text": [None]}), path)
    raises(f"{path} row 0: caption must be a string, got null", get_dataset, "parquet", path, "train")
    (tmp_path / "beside.png").write_bytes(pairs[0].data)  # Hugging Face's non-embedded image: a path, no bytes
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = pa.array([{"bytes": None, "path": "beside.png"}, {"bytes": None, "path": "gone.png"}], image_type)
    pq.write_table(pa.table({"image": cells, "text": ["a", "b"]}), path)
    ds = get_dataset("parquet", path, "train")
    np.testing.assert_array_equal(pixels(ds, 0), decoded(pairs[0]))
    with pytest.raises(UnreadableImage, match="gone.png"):
        ds.load_image(1)
    pq.write_table(pa.table({"image": [b"garbage", None], "text": ["a", "b"]}), path)
    ds = get_dataset("parquet", path, "train")
    with pytest.raises(UnreadableImage, match="unreadable image"):
        ds.load_image(0)
    with pytest.raises(UnreadableImage, match="no image bytes"):
        ds.load_image(1)
    pq.write_table(pa.table({"image": [p.data for p in pairs], "text": ["a", "b", "c"]}), path, row_group_size=2)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16  # the image column's page of row group 1, which opening never reads
    path.write_bytes(bytes(data))
    ds = get_dataset("parquet", path, "train")
    np.testing.assert_array_equal(pixels(ds, 0), decoded(pairs[0]))
    with pytest.raises(PipeError, match=f"damaged parquet file {path} \\(row group 1\\)") as info:
        ds.load_image(2)  # the file, not one image: a plain PipeError fails the run instead of skipping the row
    assert not isinstance(info.value, UnreadableImage)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    raises("needs pyarrow: pip install 'pipe-align[parquet]'", get_dataset, "parquet", path, "train")


# ------------------------------------------------------------------------------------------------ end to end


def extract(features, encoder: str, name: str, root: str, options=(), split: str = "train"):
    cfg = ExtractConfig(
        encoder=encoder,
        dataset=name,
        split=split,
        features=str(features),
        root=str(root),
        options=tuple(options),
        batch_size=4,
        shard_rows=4,
    )
    return run_extract(cfg, progress=False)


def align(shards, run) -> int:
    return main(
        [
            "align",
            "--shards",
            str(shards),
            "--out",
            str(run),
            "--anchors",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )


def test_same_pairs_in_four_containers_extract_identically_and_train(tmp_path, tiny_dinov2, tiny_bert):
    """The issue's "done when": an open_clip CSV, an imagefolder with metadata.jsonl, two WebDataset shards and two
    parquet files of the same pairs (PNG and JPEG, non-square) give the same image rows with identical tokens and
    the same captions per image, and `pipe align` trains on each."""
    pairs = make_pairs(8)
    stores = {}
    for fmt, (name, root, opts) in write_all(tmp_path / "data", pairs).items():
        feats = tmp_path / "features" / fmt
        img = open_store(extract(feats, f"hf:{tiny_dinov2}", name, root, opts).path)
        txt = open_store(extract(feats, f"hf:{tiny_bert}", name, root, opts).path)
        assert img.verify() == [] and txt.verify() == [] and not img["skipped"][:].any()
        stores[fmt] = (img, txt)
        assert align(feats / name / "train", tmp_path / "runs" / fmt) == 0, fmt
    ref_img, ref_txt = stores["csv"]
    assert list(ref_img["ids"][:]) == [p.key for p in pairs]
    texts, items = ref_txt["text"][:], ref_txt["item"][:]
    assert [[str(t) for t, it in zip(texts, items) if it == i] for i in range(len(pairs))] == [
        list(p.captions) for p in pairs
    ]
    for fmt, (img, txt) in stores.items():
        for name in ("ids", "patches", "cls"):
            np.testing.assert_array_equal(img[name][:], ref_img[name][:], err_msg=f"{fmt} {name}")
        for name in ("ids", "text", "item", "tokens", "length"):
            np.testing.assert_array_equal(txt[name][:], ref_txt[name][:], err_msg=f"{fmt} {name}")


def test_csv_held_out_split_trains_and_evaluates_retrieval(tmp_path, tiny_dinov2, tiny_bert):
    """My CSV of pairs: a `split` column, extract both splits, align on train, retrieval on the held-out split."""
    pairs = make_pairs(12)
    table = write_csv(tmp_path / "data", pairs)
    lines = table.read_text().splitlines()
    held = {p.key for p in pairs[8:]}
    table.write_text(
        "\n".join([lines[0] + ",split"] + [f"{ln},{'test' if ln[:6] in held else 'train'}" for ln in lines[1:]]) + "\n"
    )
    feats, run = tmp_path / "features", tmp_path / "run"
    for split in ("train", "test"):
        for enc in (tiny_dinov2, tiny_bert):
            assert (
                main(
                    [
                        "extract",
                        "--encoder",
                        f"hf:{enc}",
                        "--dataset",
                        "csv",
                        "--root",
                        str(table),
                        "--split",
                        split,
                        "--features",
                        str(feats),
                        "--batch-size",
                        "4",
                        "--no-progress",
                    ]
                )
                == 0
            )
    assert align(feats / "csv" / "train", run) == 0
    assert (
        main(
            [
                "eval",
                "retrieval",
                "--dataset",
                "csv",
                "--root",
                str(table),
                "--split",
                "test",
                "--features",
                str(feats),
                "--run",
                str(run),
                "--examples",
                "2",
            ]
        )
        == 0
    )
    result = json.loads((run / "eval" / "retrieval-csv-test.json").read_text())
    metrics = result.get("metrics", result)
    assert metrics["images"] == 4 and metrics["captions"] == sum(len(p.captions) for p in pairs[8:])
    assert list((run / "eval" / "figures").glob("*.png"))  # the examples figure shows the held-out images


def test_interrupted_webdataset_extraction_resumes_and_verifies(tmp_path, tiny_dinov2, monkeypatch):
    """Stable ids: a run stopped mid-way resumes into the same store and ends equal to an unbroken run."""
    write_webdataset(tmp_path / "wds", make_pairs(10), shards=2)
    root, enc = f"{tmp_path}/wds/{{00000..00001}}.tar", f"hf:{tiny_dinov2}"
    ref = open_store(extract(tmp_path / "ref", enc, "webdataset", root).path)
    original = WebDataset.load_image

    def dying(self, i):
        if i >= 8:  # the third store shard: the first is written by then
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(WebDataset, "load_image", dying)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "killed", enc, "webdataset", root)
    monkeypatch.setattr(WebDataset, "load_image", original)
    path = next((tmp_path / "killed" / "webdataset" / "train").glob("*.zarr"))
    part = open_store(path, require_complete=False)
    assert 0 < part["done"][:].sum() < 10 and not part.complete
    summary = extract(tmp_path / "killed", enc, "webdataset", root)
    assert 0 < summary.written_rows < 10  # resumed, not started again
    st = open_store(summary.path)
    for name in ("ids", "patches", "cls"):
        np.testing.assert_array_equal(st[name][:], ref[name][:])
    assert main(["verify", str(summary.path)]) == 0


def test_samples_without_caption_are_listed_or_fatal_with_strict(tmp_path, tiny_dinov2, capsys):
    pairs = make_pairs(3)
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for p in pairs:
            tar_member(tar, f"{p.key}{p.suffix}", p.data)
            if p.key != "000001":
                tar_member(tar, f"{p.key}.txt", p.captions[0].encode())
    args = [
        "extract",
        "--encoder",
        f"hf:{tiny_dinov2}",
        "--dataset",
        "webdataset",
        "--root",
        str(path),
        "--no-progress",
    ]
    assert main([*args, "--features", str(tmp_path / "f1")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable images" in out and "000001: UnreadableImage" in out and "has no caption" in out
    assert main([*args, "--features", str(tmp_path / "f2"), "--strict"]) == 2
    assert "image 000001 is unreadable" in capsys.readouterr().err
