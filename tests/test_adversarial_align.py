"""Nothing silent on the align side: mixed, changed or damaged inputs of `pipe align` end with one line and exit 2,
never with a result (issue 11). Absurd option values and non-finite training are in tests/test_loop.py."""

from __future__ import annotations

import json
import shutil

import pytest

from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store
from pipe_align.pipelines.cli import main
from tests.helpers import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_train(world_features, dest):
    shutil.copytree(world_features / "world" / "train", dest)
    return dest


def extract_world(features, encoder: str, text: str, **options) -> None:
    cfg = ExtractConfig(
        encoder=encoder,
        dataset="world",
        split="train",
        features=str(features),
        text=text,
        options=tuple(sorted(options.items())),
        batch_size=8,
        shard_rows=8,
    )
    run_extract(cfg, progress=False)


FAST = [
    "--anchors",
    "8",
    "--no-use-cls",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--val-fraction",
    "0.25",
    "--no-progress",
]  # K and token set given: no recipe probes before the training these tests interrupt


@pytest.mark.parametrize("method", ["cca", "csa"])
def test_closed_forms_on_two_pairs_save_nothing_non_finite(tmp_path, world_features, capsys, method):
    """Two pairs whose captions have one sentence embedding: the text covariance is zero, its whitening infinite."""
    shards = copy_train(world_features, tmp_path / "shards")
    captions = open_store(next(p for p in shards.glob("*.zarr") if "bert" in p.name))
    item, pooled = captions["item"][:], captions["pooled"][:]
    pooled[item < 2] = pooled[0]
    captions["pooled"][:] = pooled
    out = tmp_path / method
    code = main(
        [
            "align",
            "--method",
            method,
            "--shards",
            str(shards),
            "--out",
            str(out),
            "--limit",
            "2",
            "--val-fraction",
            "0",
            "--no-progress",
        ]
    )
    assert "not finite" in one_line_error(capsys, code)
    assert not (out / "weights.safetensors").exists() and not json.loads((out / "run.json").read_text())["complete"]


def test_image_and_caption_stores_of_different_data_are_refused(tmp_path, world_features, tiny_bert, capsys):
    other = tmp_path / "other"
    extract_world(other, f"hf:{tiny_bert}", "captions", size=24, seed=5)  # same ids, other scenes and captions
    mixed = copy_train(world_features, tmp_path / "mixed")
    caption_store = next(p for p in mixed.glob("*.zarr") if "bert" in p.name)
    shutil.rmtree(caption_store)
    shutil.copytree(other / "world" / "train" / caption_store.name, caption_store)
    code = main(["align", "--shards", str(mixed), "--out", str(tmp_path / "run"), *FAST])
    err = one_line_error(capsys, code)
    assert "different data" in err and "seed=5" in err
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_not_returned_for_re_extracted_stores(
    tmp_path, world_features, tiny_dinov2, tiny_bert, capsys
):
    shards = copy_train(world_features, tmp_path / "stores")
    args = ["align", "--shards", str(shards), "--out", str(tmp_path / "run"), *FAST]
    assert main(args) == 0
    capsys.readouterr()
    shutil.rmtree(shards)
    fresh = tmp_path / "fresh"
    extract_world(fresh, f"hf:{tiny_dinov2}", "auto", size=16)  # the same command with other -o: other data
    extract_world(fresh, f"hf:{tiny_bert}", "captions", size=16)
    shutil.copytree(fresh / "world" / "train", shards)
    assert "other settings or data" in one_line_error(capsys, main(args))


def test_resume_refuses_re_extracted_stores_and_accepts_a_relative_path(
    tmp_path, world_features, tiny_dinov2, tiny_bert, capsys, monkeypatch, interrupt_at
):
    shards = copy_train(world_features, tmp_path / "stores")
    interrupt_at(1)  # in the second epoch, after the first checkpoint
    assert main(["align", "--shards", str(shards), "--out", str(tmp_path / "run"), *FAST]) == 130  # interrupted
    interrupt_at(None)
    # the same folder written relatively: the same stores, so the run resumes
    monkeypatch.chdir(tmp_path)
    assert main(["align", "--shards", "stores", "--out", "run", *FAST, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["complete"]
    # interrupted again, then the stores are re-extracted with other data: --resume must not continue on them
    interrupt_at(1)
    assert main(["align", "--shards", "stores", "--out", "run2", *FAST]) == 130
    interrupt_at(None)
    shutil.rmtree(shards)
    fresh = tmp_path / "fresh"
    extract_world(fresh, f"hf:{tiny_dinov2}", "auto", size=24, seed=3)
    extract_world(fresh, f"hf:{tiny_bert}", "captions", size=24, seed=3)
    shutil.copytree(fresh / "world" / "train", shards)
    capsys.readouterr()
    code = main(["align", "--shards", "stores", "--out", "run2", *FAST, "--resume"])
    assert "other options or data" in one_line_error(capsys, code)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_checkpoint_is_one_line(tmp_path, world_features, capsys, interrupt_at, damage):
    interrupt_at(1)
    args = ["align", "--shards", str(world_features / "world" / "train"), "--out", str(tmp_path / "run"), *FAST]
    assert main(args) == 130
    interrupt_at(None)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": bytes(range(256)) * 64}[damage])
    capsys.readouterr()
    err = one_line_error(capsys, main([*args, "--resume"]))
    assert "checkpoint.pt" in err and "cannot be read" in err


def test_a_damaged_run_json_is_one_line(tmp_path, world_features, capsys):
    args = ["align", "--shards", str(world_features / "world" / "train"), "--out", str(tmp_path / "run"), *FAST]
    assert main(args) == 0
    run_json = tmp_path / "run" / "run.json"
    run_json.write_text(run_json.read_text()[:100])
    capsys.readouterr()
    assert "run.json" in one_line_error(capsys, main(args))


def test_run_json_is_written_atomically(tmp_path, world_features, monkeypatch):
    """Every write of run.json goes through a temporary file and a rename: a kill mid-write leaves the old file."""
    import os

    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(str(b)), real(a, b))[1])
    args = ["align", "--shards", str(world_features / "world" / "train"), "--out", str(tmp_path / "run"), *FAST]
    assert main(args) == 0
    assert sum(p.endswith("run.json") for p in renamed) >= 2  # the start, every epoch, the end
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_progress_to_a_log_is_one_unwrapped_line_per_epoch(tmp_path, world_features, capsys):
    """Not a terminal (a log file, CI): no live bar redrawn into the file, and no field wrapped onto another line
    (the per-epoch lines reach the terminal with --verbose; without it only the summary, tests/test_logs.py)."""
    args = [
        "align",
        "--shards",
        str(world_features / "world" / "train"),
        "--out",
        str(tmp_path / "run"),
        "--verbose",
        *[a for a in FAST if a != "--no-progress"],
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()  # progress on stderr, as extraction's; the result alone on stdout
    assert len(lines) == 4 and all(line.startswith("pal epoch ") and "pairs_per_s" in line for line in lines[:3]), lines
    assert lines[3].startswith("pal: stopped at epoch 2, reached --epochs 3;"), lines
    assert out.splitlines() == [out.splitlines()[0]] and out.startswith(str(tmp_path / "run")), out


def test_a_file_that_ends_early_is_an_error_not_an_interrupt(tmp_path, world_features, capsys, monkeypatch):
    """click turns an EOFError into Abort (Ctrl-D at a prompt); a reader's EOFError (a truncated .gz) is bad data."""
    from pipe_align.align import run

    def truncated(*a, **k):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(run, "find_pair_stores", truncated)
    code = main(["align", "--shards", str(world_features / "world" / "train"), "--out", str(tmp_path / "r"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "error: a file ended early (Compressed file ended" in err, err
