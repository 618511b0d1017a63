"""Damaged, mixed and stale stores and run dirs, made the way a hostile but realistic user (or a disk) makes them:
flipped bits, truncated, zeroed, swapped and deleted files, NaN features, broken weights and method.json, absurd
options. Nothing of it may give a result with exit 0: `pipe verify` exits 1 with one line per problem, every other
command exits 2 with one line naming the file, array, row or option. Stores come from real `pipe extract` runs of
the tiny models (conftest's `world_features`), copied per test before they are damaged."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import StoreLayout, create_store, open_store
from pipe_align.pipelines.cli import main
from tests.helpers import one_line_error

IMAGE_ARRAYS = ("ids", "cls", "patches", "labels", "done", "skipped", "digest")
TEXT_ARRAYS = ("ids", "text", "item", "tokens", "length", "pooled", "done", "skipped", "digest")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def feats(tmp_path, world_features) -> Path:
    """A private copy of the world stores (train: 24 images in 3 shards of 8; val: 8 images, captions, prompts)."""
    return Path(shutil.copytree(world_features, tmp_path / "features"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, world_features) -> Path:
    """A small PAL run trained on the world train stores (read-only: tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "pal"
    code = main(
        [
            "align",
            "--shards",
            str(world_features / "world" / "train"),
            "--out",
            str(out),
            "--anchors",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.25",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


@pytest.fixture
def run_dir(tmp_path, trained) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def store(feats: Path, split: str, kind: str) -> Path:
    """The image, caption or prompt store of a world split."""
    paths = sorted((feats / "world" / split).glob("*.zarr"))
    pick = {
        "image": lambda p: "dinov2" in p.name,
        "prompts": lambda p: p.name.endswith(".prompts.zarr"),
        "captions": lambda p: "bert" in p.name and not p.name.endswith(".prompts.zarr"),
    }[kind]
    return next(p for p in paths if pick(p))


def chunk_files(array: Path, shard: int | None = None) -> list[Path]:
    """The chunk (or shard) files of an array, optionally only those of one row shard (first chunk coordinate)."""
    files = sorted(f for f in (array / "c").rglob("*") if f.is_file())
    return [f for f in files if shard is None or f.relative_to(array / "c").parts[0] == str(shard)]


def verify(path: Path, capsys) -> tuple[int, list[str]]:
    code = main(["verify", str(path)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def evaluate(feats: Path, run: Path, task: str = "classification", *extra: str) -> int:
    return main(
        [
            "eval",
            task,
            "--dataset",
            "world",
            "--split",
            "val",
            "--features",
            str(feats),
            "--run",
            str(run),
            "-o",
            "size=8",
            "--device",
            "cpu",
            "--no-figures",
            *extra,
        ]
    )


# -- 1. pipe verify sees damage --------------------------------------------------------------------------------------
def test_verify_catches_every_single_bit_flip_in_shard_files(feats, capsys):
    """20 seeded single-bit flips anywhere in the patch shard files (chunk data, crc bytes, shard index): each one
    is reported (exit 1, a line naming the array). Before checksums, 16 of 20 passed."""
    path = store(feats, "train", "image")
    files = chunk_files(path / "patches")
    rng = np.random.default_rng(0)
    for _ in range(20):
        f = files[rng.integers(len(files))]
        data = bytearray(f.read_bytes())
        pos, bit = int(rng.integers(len(data))), int(rng.integers(8))
        data[pos] ^= 1 << bit
        original = f.read_bytes()
        f.write_bytes(bytes(data))
        code, lines = verify(path, capsys)
        assert code == 1 and any("'patches'" in line for line in lines), (f.name, pos, bit, lines)
        f.write_bytes(original)
    assert verify(path, capsys)[0] == 0


@pytest.mark.parametrize(
    "kind,array", [("image", a) for a in IMAGE_ARRAYS if a != "patches"] + [("captions", a) for a in TEXT_ARRAYS]
)
def test_verify_catches_bit_flips_in_every_array(feats, capsys, kind, array):
    path = store(feats, "train", kind)
    rng = np.random.default_rng(1)
    files = chunk_files(path / array)
    assert files, "every chunk is written, even one that equals the fill value"
    for f in files[:3]:
        original = f.read_bytes()
        data = bytearray(original)
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        f.write_bytes(bytes(data))
        code, lines = verify(path, capsys)
        assert code == 1 and any(f"'{array}'" in line for line in lines), lines
        f.write_bytes(original)


@pytest.mark.parametrize(
    "kind,array",
    [("image", "patches"), ("image", "cls"), ("image", "ids"), ("captions", "tokens"), ("captions", "length")],
)
def test_verify_catches_swapped_shard_files(feats, capsys, kind, array):
    """Shard files of one array swapped between two places: every chunk passes its own checksum, the row digests
    (which hash the row index) do not."""
    path = store(feats, "train", kind)
    first, second = chunk_files(path / array, 0), chunk_files(path / array, 1)
    assert first and len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        da, db = a.read_bytes(), b.read_bytes()
        a.write_bytes(db)
        b.write_bytes(da)
    code, lines = verify(path, capsys)
    assert code == 1 and any(f"'{array}'" in line and "digest" in line for line in lines), lines


@pytest.mark.parametrize("kind,array", [("image", a) for a in IMAGE_ARRAYS] + [("captions", a) for a in TEXT_ARRAYS])
def test_verify_catches_each_deleted_chunk(feats, capsys, kind, array):
    """A lost chunk file of any array, integer, string and flag arrays included (they read back as their fill
    value, which can be a valid value: labels -1, length 0, skipped False)."""
    path = store(feats, "train", kind)
    files = chunk_files(path / array, 1)
    assert files, "every chunk is written, even one that equals the fill value"
    for f in files:
        f.unlink()
    code, lines = verify(path, capsys)
    assert code == 1 and any(f"'{array}'" in line and "missing" in line for line in lines), lines


def test_verify_reports_damaged_array_metadata(feats, capsys):
    path = store(feats, "val", "image")
    (path / "labels" / "zarr.json").write_text("{ not json")
    (path / "patches" / "zarr.json").unlink()
    code, lines = verify(path, capsys)
    assert code == 1 and any("'labels'" in line for line in lines) and any("'patches'" in line for line in lines)
    assert all(line.startswith(str(path)) for line in lines), lines


def test_store_without_checksums_is_reported_and_still_opens(tmp_path, capsys):
    """Stores written before checksums: they open and read as before, and `pipe verify` says they cannot be
    checked (exit 1) instead of passing them."""
    enc = {"alias": "tiny", "model_id": "/tmp/tiny", "dim": 4, "layer": "last"}
    lay = StoreLayout(
        modality="image",
        encoder=enc,
        dataset="world",
        split="val",
        count=4,
        tokens=2,
        dim=4,
        rows_per_chunk=2,
        rows_per_shard=4,
        grid=(1, 2),
        checksums=None,
    )
    st = create_store(tmp_path / "old.zarr", lay)
    rows = {
        "ids": np.array(list("abcd")),
        "cls": np.ones((4, 4), np.float16),
        "patches": np.ones((4, 2, 4), np.float16),
        "labels": np.zeros(4, np.int32),
    }
    st.write_shard(0, rows, np.zeros(4, bool))
    st.finalize()
    assert "digest" not in [name for name, _ in st.group.arrays()]
    code, lines = verify(tmp_path / "old.zarr", capsys)
    assert code == 1 and len(lines) == 1 and "without checksums" in lines[0], lines
    np.testing.assert_array_equal(open_store(tmp_path / "old.zarr").read("labels"), rows["labels"])


# -- 1 and 3: what readers do with damage -----------------------------------------------------------------------------
def test_lost_labels_stop_classification(feats, run_dir, capsys):
    """Before: the labels chunk read back as -1 ("unlabelled"), and classification scored the other images."""
    for f in chunk_files(store(feats, "val", "image") / "labels"):
        f.unlink()
    one_line_error(capsys, evaluate(feats, run_dir), "'labels'", "missing", "pipe verify")


def test_lost_lengths_stop_align(feats, tmp_path, capsys):
    """Before: the length chunk read back as 0 and PAL trained on zero-length captions."""
    for f in chunk_files(store(feats, "train", "captions") / "length", 0):
        f.unlink()
    code = main(
        [
            "align",
            "--shards",
            str(feats / "world" / "train"),
            "--out",
            str(tmp_path / "r"),
            "--anchors",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    one_line_error(capsys, code, "'length'", "missing")


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_truncated_or_zeroed_shard_file_is_one_line(feats, run_dir, capsys, damage):
    path = store(feats, "val", "image")
    f = chunk_files(path / "patches")[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(len(data)))
    code, lines = verify(path, capsys)
    assert code == 1 and any("'patches'" in line and "checksum" in line for line in lines), lines
    one_line_error(capsys, evaluate(feats, run_dir), str(path), "'patches'", "checksum")
    with pytest.raises(PipeError, match="'patches' is damaged"):
        open_store(path).read("patches", np.array([0, 1]))


def test_missing_array_is_one_line(feats, run_dir, capsys):
    """Before: a KeyError traceback."""
    path = store(feats, "val", "image")
    shutil.rmtree(path / "patches")
    one_line_error(capsys, evaluate(feats, run_dir), str(path), "'patches'", "is damaged", "zarr.json is missing")


# -- 2. non-finite features ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_eval_refuses_non_finite_patches(feats, run_dir, capsys, task):
    """Before: segmentation scored a store with NaN patches (exit 0, mIoU 0.089)."""
    path = store(feats, "val", "image")
    st = open_store(path)
    bad = st["patches"][5:6].copy()
    bad[0, 1, 2] = np.nan
    st["patches"][5:6] = bad
    one_line_error(capsys, evaluate(feats, run_dir, task), str(path), "'patches'", "non-finite", "row 5")


# -- 4. run dirs -------------------------------------------------------------------------------------------------------
def _anchors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "anchors.safetensors"))


def _set_method(run: Path, **change) -> None:
    meta = json.loads((run / "method.json").read_text())
    config = meta["config"] | change.pop("config", {})
    (run / "method.json").write_text(json.dumps(meta | {"config": config} | change))


RUN_DAMAGE = {
    "anchors-truncated": (
        "anchors.safetensors",
        lambda r: (r / "anchors.safetensors").write_bytes((r / "anchors.safetensors").read_bytes()[:100]),
    ),
    "anchors-random": (
        "anchors.safetensors",
        lambda r: (r / "anchors.safetensors").write_bytes(np.random.default_rng(0).bytes(4096)),
    ),
    "anchors-empty": ("anchors.safetensors", lambda r: (r / "anchors.safetensors").write_bytes(b"")),
    "anchors-nan": (
        "anchors.safetensors",
        lambda r: save_file({k: v * float("nan") for k, v in _anchors(r).items()}, str(r / "anchors.safetensors")),
    ),
    "anchors-other-dim": (
        "anchors.safetensors",
        lambda r: save_file(
            {k: torch.randn(v.shape[0], v.shape[1] + 3) for k, v in _anchors(r).items()}, str(r / "anchors.safetensors")
        ),
    ),
    "anchors-banks-differ": (
        "anchors.safetensors",
        lambda r: save_file(
            {k: v[: 4 if k == "text_anchors" else None].contiguous() for k, v in _anchors(r).items()},
            str(r / "anchors.safetensors"),
        ),
    ),
    "anchors-one-bank": (
        "anchors.safetensors",
        lambda r: save_file({"image_anchors": _anchors(r)["image_anchors"]}, str(r / "anchors.safetensors")),
    ),
    "method-json-malformed": ("method.json", lambda r: (r / "method.json").write_text('{"method": "pal",')),
    "method-json-list": ("method.json", lambda r: (r / "method.json").write_text("[1, 2]")),
    "method-json-anchors-negative": ("method.json", lambda r: _set_method(r, config={"anchors": -3})),
    "method-json-anchors-text": ("method.json", lambda r: _set_method(r, config={"anchors": "many"})),
    "method-json-tau-text": ("method.json", lambda r: _set_method(r, config={"tau": "0.05"})),
    "method-json-unknown-method": ("method.json", lambda r: _set_method(r, method="palx")),
    "method-json-other-method": ("method.json", lambda r: _set_method(r, method="procrustes")),
    "run-json-list": ("run.json", lambda r: (r / "run.json").write_text("[]")),
}


@pytest.mark.parametrize("case", sorted(RUN_DAMAGE))
def test_damaged_run_dir_is_one_line_naming_the_file(feats, run_dir, capsys, case):
    name, damage = RUN_DAMAGE[case]
    damage(run_dir)
    one_line_error(capsys, evaluate(feats, run_dir), name)


# -- 5. absurd options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("--examples", "-3"), ("--seed", "-1")])
def test_absurd_eval_options_are_refused(feats, trained, capsys, option, value):
    one_line_error(capsys, evaluate(feats, trained, "diagnostics", option, value), option)
    assert not (trained / "eval").exists() or not list((trained / "eval").glob("diagnostics-*.json"))


# -- 6. tasks that need classes, on a dataset without them ---------------------------------------------------------
@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_class_tasks_on_a_caption_only_dataset_say_so(feats, trained, capsys, task):
    """A captions-only dataset (here: the world's stores relabelled as COCO, which has no classes): the error says
    that the dataset has no classes instead of suggesting a `pipe extract --text prompts` that cannot work."""
    coco = feats / "coco" / "val"
    coco.mkdir(parents=True)
    for kind in ("image", "captions"):
        src = store(feats, "val", kind)
        dst = Path(shutil.copytree(src, coco / src.name))
        st = open_store(dst)
        st.group.attrs.update({"dataset": "coco", "classes": None, "origin": None})
    code = main(
        [
            "eval",
            task,
            "--dataset",
            "coco",
            "--split",
            "val",
            "--features",
            str(feats),
            "--run",
            str(trained),
            "--device",
            "cpu",
            "--no-figures",
        ]
    )
    err = one_line_error(capsys, code, "coco", "no classes")
    assert "--text prompts" not in err


def test_layout_change_of_checksums_is_not_resumed(tmp_path):
    """A store started by a pipe without checksums is not finished by one with them (a mixed store)."""
    enc = {"alias": "tiny", "model_id": "/tmp/tiny", "dim": 4, "layer": "last"}
    lay = StoreLayout(
        modality="image",
        encoder=enc,
        dataset="world",
        split="val",
        count=8,
        tokens=2,
        dim=4,
        rows_per_chunk=2,
        rows_per_shard=4,
        grid=(1, 2),
    )
    create_store(tmp_path / "s.zarr", replace(lay, checksums=None))
    with pytest.raises(PipeError, match="differs in checksums"):
        create_store(tmp_path / "s.zarr", lay)


def test_verify_of_a_store_whose_group_metadata_is_damaged(feats, tmp_path, capsys):
    path = store(feats, "val", "image")
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {"schema": 1')
    code, lines = verify(path, capsys)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(str(path)), lines
    one_line_error(capsys, main(["verify", str(tmp_path / "nothing.zarr")]), "no feature store")


def test_info_shows_damage_instead_of_failing(feats, capsys):
    path = store(feats, "val", "image")
    (path / "patches" / "zarr.json").unlink()
    for f in chunk_files(path / "done"):
        f.unlink()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "damaged (patches/zarr.json is missing)" in out and "done_rows       unreadable" in out, out


def test_store_marked_old_is_noted_by_eval(feats, trained, capsys):
    """A store without the checksum format attribute (as written before it) still evaluates, with a note that its
    damage cannot be detected."""
    for kind in ("image", "prompts"):
        st = open_store(store(feats, "val", kind))
        attrs = dict(st.group.attrs)
        attrs.pop("checksums")
        st.group.attrs.put(attrs)
    assert evaluate(feats, trained) == 0
    err = capsys.readouterr().err
    assert err.count("no checksums") == 2 and "note:" in err, err


@pytest.mark.parametrize(
    "content,fragment", [("[]", "not an eval result"), ('{"task": "classification", "acc1": "high"}', "acc1")]
)
def test_report_refuses_results_it_cannot_vouch_for(tmp_path, capsys, content, fragment):
    """Before: a result that is no JSON object was left out of the table without a word; a text where a number
    belongs was a ValueError traceback."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text("[1]")  # unreadable method: the table says "?", no traceback
    (run / "eval" / "classification-world-val.json").write_text(content)
    one_line_error(capsys, main(["report", str(run)]), "classification-world-val.json", fragment)
    (run / "eval" / "classification-world-val.json").write_text('{"task": "classification", "acc1": 0.5}')
    assert main(["report", str(run)]) == 0
    assert "| run | ? | 50.0 |" in capsys.readouterr().out


def test_unfinished_run_is_not_evaluated(feats, run_dir, capsys):
    """A run dir whose run.json says complete: false (`pipe align` interrupted; its weights, if any, are not the
    run's result)."""
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(meta | {"complete": False}))
    one_line_error(capsys, evaluate(feats, run_dir), "run.json", "not finished", "--resume")


def test_skip_existing_does_not_keep_a_broken_result(feats, run_dir, capsys):
    """Before: `--skip-existing` kept any file at the result's path, a truncated or foreign one included."""
    assert evaluate(feats, run_dir) == 0
    path = run_dir / "eval" / "classification-world-val.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:40])
    capsys.readouterr()
    assert evaluate(feats, run_dir, "classification", "--skip-existing") == 0
    assert "evaluated again" in capsys.readouterr().err
    assert json.loads(path.read_text())["acc1"] == good["acc1"]
    assert evaluate(feats, run_dir, "classification", "--skip-existing") == 0
    assert "exists, skipped" in capsys.readouterr().out


def test_truncated_shard_stops_align_with_one_line(feats, tmp_path, capsys):
    path = store(feats, "train", "image")
    f = chunk_files(path / "patches", 1)[0]
    f.write_bytes(f.read_bytes()[:-100])
    code = main(
        [
            "align",
            "--shards",
            str(feats / "world" / "train"),
            "--out",
            str(tmp_path / "r"),
            "--anchors",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    one_line_error(capsys, code, str(path), "'patches'", "checksum")
