"""`pipe align` with PAL on tiny stores: learning, outputs, resume, streaming vs memory, bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from pipe_align.align.data import PairSource, find_pair_stores, pair_split
from pipe_align.align.loop import RunConfig
from pipe_align.align.methods import load_aligner
from pipe_align.align.pal import PAL
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.extract.store import open_store
from pipe_align.pipelines.cli import main

FAST = (("anchors", 16), ("tau_p", 0.1), ("use_cls", False))  # K and token set given: no recipe probes
RUN = RunConfig(batch_size=8, epochs=4, val_fraction=0.25)


def shards(feats, split="train"):
    return str(feats / "world" / split)


def test_pal_run_dir_and_learning(tmp_path, world_features):
    out = run_align(
        AlignConfig(shards=shards(world_features), out=str(tmp_path / "run"), params=FAST, run=RUN), progress=False
    ).path
    meta = json.loads((out / "run.json").read_text())
    assert meta["complete"] and meta["method"] == "pal" and (meta["pairs"]["train"], meta["pairs"]["val"]) == (18, 6)
    assert len(meta["history"]) == 4 and meta["data_mode"] == "memory"
    held = meta["heldout"]  # the same held-out retrieval every method gets, for picking settings
    r1 = (held["heldout_text_retrieval_recall@1"], held["heldout_image_retrieval_recall@1"])
    assert held["heldout_mean_r1"] == sum(r1) / 2 and 0 <= min(r1) <= max(r1) <= 1
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]  # the anchors learn something
    assert (out / "anchors.safetensors").exists() and (out / "loss.png").stat().st_size > 0
    assert not (out / "checkpoint.pt").exists()
    pal = load_aligner(out)
    assert pal.image_anchors.shape == (16, 32) and pal.text_anchors.shape == (16, 32)
    # finished run with the same settings: nothing to do; other settings without --resume: refused
    again = run_align(AlignConfig(shards=shards(world_features), out=str(out), params=FAST, run=RUN), progress=False)
    assert again.path == out and again.meta == meta
    with pytest.raises(Exception, match="finished run with other settings"):
        run_align(AlignConfig(shards=shards(world_features), out=str(out), params=FAST[1:], run=RUN), progress=False)


def test_resume_after_interruption_equals_unbroken_run(tmp_path, world_features, interrupt_at):
    cfg_full = AlignConfig(shards=shards(world_features), out=str(tmp_path / "full"), params=FAST, run=RUN)
    full = run_align(cfg_full, progress=False).path
    interrupt_at(2)  # during the third epoch
    cfg = AlignConfig(shards=shards(world_features), out=str(tmp_path / "cut"), params=FAST, run=RUN)
    with pytest.raises(KeyboardInterrupt):
        run_align(cfg, progress=False)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    assert not json.loads((tmp_path / "cut" / "run.json").read_text())["complete"]
    interrupt_at(None)
    with pytest.raises(Exception, match="--resume"):
        run_align(cfg, progress=False)
    resumed = run_align(dataclasses.replace(cfg, resume=True), progress=False).path
    a, b = load_aligner(full), load_aligner(resumed)
    torch.testing.assert_close(a.image_anchors, b.image_anchors, rtol=0, atol=0)
    torch.testing.assert_close(a.text_anchors, b.text_anchors, rtol=0, atol=0)


def test_streaming_serves_every_pair_once_per_epoch(world_features):
    stores = find_pair_stores(shards(world_features))
    split = pair_split(stores, 0.0, 0)
    mem = PairSource(stores, split.train, split.captions, tokens=True)
    stream = PairSource(stores, split.train, split.captions, tokens=True, memory_budget=0, block_rows=8)
    assert mem.in_memory and not stream.in_memory
    for epoch in (0, 1):
        got = {}
        for src in (mem, stream):
            rows, toks = [], {}
            for batch in src.batches(epoch, 5, seed=3):
                rows.extend(batch.rows.tolist())
                for r, t in zip(batch.rows.tolist(), batch.text.tokens):
                    toks[r] = t
            assert sorted(rows) == sorted(split.train.tolist())
            got[src.in_memory] = toks
        for r in split.train.tolist():  # the same caption is drawn for each image in both modes
            torch.testing.assert_close(got[True][r], got[False][r])
    # the caption draw changes between epochs for images that have several captions
    c0, c1 = mem.choose_captions(split.train, 0, 3), mem.choose_captions(split.train, 1, 3)
    assert (c0 != c1).any()


def test_streamed_training_runs(tmp_path, world_features):
    out = run_align(
        AlignConfig(
            shards=shards(world_features),
            out=str(tmp_path / "s"),
            params=FAST,
            run=RunConfig(batch_size=8, epochs=4, val_fraction=0.25, memory_budget=0),
        ),
        progress=False,
    )
    assert out.meta["data_mode"] == "stream" and json.loads((out.path / "run.json").read_text()) == out.meta


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, world_features, monkeypatch):
    original = PAL.loss
    calls = {"n": 0}

    def poisoned(self, *a):
        calls["n"] += 1
        loss, extras = original(self, *a)
        return (loss * float("nan") if calls["n"] > 3 else loss), extras  # 3 steps = the first epoch is fine

    monkeypatch.setattr(PAL, "loss", poisoned)
    code = main(
        [
            "align",
            "--shards",
            shards(world_features),
            "--out",
            str(tmp_path / "r"),
            "--anchors",
            "16",
            "--no-use-cls",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.25",
            "--no-progress",
        ]
    )
    assert code == 2
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and all(torch.isfinite(p).all() for p in state["params"])


def test_bad_inputs(tmp_path, world_features, capsys):
    def run(*extra):
        code = main(["align", "--out", str(tmp_path / "bad"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
        return err

    assert "no such folder" in run("--shards", str(tmp_path / "none"))
    assert "no option" in run("--shards", shards(world_features), "-p", "nope=1")
    assert "unknown method" in run("--shards", shards(world_features), "--method", "nope")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for split, kind in (("train", "dinov2"), ("val", "bert")):
        stores = (world_features / "world" / split).glob("*.zarr")
        src = next(p for p in stores if kind in p.name and "prompts" not in p.name)
        shutil.copytree(src, mixed / src.name)
    assert "one dataset split" in run("--shards", str(mixed))
    incomplete = tmp_path / "inc"
    shutil.copytree(world_features / "world" / "train", incomplete)
    st = open_store(next(p for p in incomplete.glob("*.zarr") if "bert" in p.name))
    st.group.attrs["complete"] = False
    assert "incomplete" in run("--shards", str(incomplete))
    nan = tmp_path / "nan"
    shutil.copytree(world_features / "world" / "train", nan)
    st = open_store(next(p for p in nan.glob("*.zarr") if "dinov2" in p.name))
    st["patches"][3] = np.full(st["patches"].shape[1:], np.nan, np.float16)
    assert "non-finite values in row 3" in run("--shards", str(nan))
    one = tmp_path / "one"
    shutil.copytree(world_features / "world" / "train", one)
    st = open_store(next(p for p in one.glob("*.zarr") if "bert" in p.name))
    st["item"][:] = np.zeros(st.layout.count, np.int64)  # every caption describes image 0: a single pair
    assert "need at least 2" in run("--shards", str(one))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["align", "--shards", shards(world_features), "--out", str(blocker / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(blocker) in err, err


def test_resume_with_other_dims_is_refused(tmp_path, world_features, interrupt_at):
    cfg = AlignConfig(shards=shards(world_features), out=str(tmp_path / "r"), params=FAST, run=RUN)
    interrupt_at(1)
    with pytest.raises(KeyboardInterrupt):
        run_align(cfg, progress=False)
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    state["params"][0] = torch.zeros(16, 7)
    torch.save(state, tmp_path / "r" / "checkpoint.pt")
    with pytest.raises(Exception, match="do not match"):
        run_align(dataclasses.replace(cfg, resume=True), progress=False)


def test_sotalign_reads_unpaired_stores(tmp_path, world_features, monkeypatch):
    from pipe_align.align.sotalign import SOTAlign

    seen = {}
    original = SOTAlign.setup

    def spy(self, data, seed):
        seen["unpaired"] = data.unpaired
        return original(self, data, seed)

    monkeypatch.setattr(SOTAlign, "setup", spy)
    code = main(
        [
            "align",
            "--method",
            "sotalign",
            "--shards",
            shards(world_features),
            "--out",
            str(tmp_path / "s"),
            "--unpaired-shards",
            shards(world_features, "val"),
            "--epochs",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    img, txt = seen["unpaired"]
    val_img = open_store(next(p for p in (world_features / "world" / "val").glob("*dinov2*.zarr")))
    val_txt = open_store(next(p for p in (world_features / "world" / "val").glob("*bert.zarr")))
    assert img.cls.shape == (val_img.layout.count, val_img.layout.dim)  # the val rows, without their pairing
    assert txt.pooled.shape == (val_txt.layout.count, val_txt.layout.dim)
    assert (
        main(
            [
                "align",
                "--method",
                "sotalign",
                "--shards",
                shards(world_features),
                "--out",
                str(tmp_path / "t"),
                "--unpaired-shards",
                str(tmp_path / "none"),
                "--no-progress",
            ]
        )
        == 2
    )


def test_unpaired_stores_are_checked(tmp_path, world_features, capsys):
    import zarr

    base = ["align", "--method", "sotalign", "--shards", shards(world_features), "--epochs", "1", "--no-progress"]
    only_text = tmp_path / "only-text"
    only_text.mkdir()
    for p in (world_features / "world" / "val").glob("*bert.zarr"):
        shutil.copytree(p, only_text / p.name)
    assert main([*base, "--out", str(tmp_path / "a"), "--unpaired-shards", str(only_text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image store of" in err[0] and str(only_text) in err[0]
    broken = tmp_path / "broken"
    shutil.copytree(world_features / "world" / "val", broken)
    img = next(broken.glob("*dinov2*.zarr"))
    zarr.open_group(img, mode="r+").attrs["complete"] = False
    assert main([*base, "--out", str(tmp_path / "b"), "--unpaired-shards", str(broken)]) == 2
    assert "incomplete" in capsys.readouterr().err and not (tmp_path / "b" / "run.json").exists()
    zarr.open_group(img, mode="r+").attrs["complete"] = True
    arr = zarr.open_group(img, mode="r+")["cls"]
    arr[3] = np.nan
    assert main([*base, "--out", str(tmp_path / "c"), "--unpaired-shards", str(broken)]) == 2
    assert "non-finite values in row 3" in capsys.readouterr().err


def test_bad_pal_values_and_other_data_are_refused(tmp_path, world_features, capsys):
    base = ["align", "--shards", shards(world_features), "--no-progress"]
    for flag, value in (
        ("--anchors", "0"),
        ("--batch-size", "1"),
        ("--tau-p", "0"),
        ("--epochs", "0"),
        ("--val-fraction", "2"),
        ("--limit", "-3"),
    ):
        assert main([*base, "--out", str(tmp_path / "bad"), flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, (flag, err)
    out = str(tmp_path / "run")
    assert main([*base, "--out", out, "--anchors", "8", "--epochs", "1", "--batch-size", "8"]) == 0
    other = ["align", "--shards", shards(world_features, "val"), "--no-progress"]
    assert main([*other, "--out", out, "--anchors", "8", "--epochs", "1", "--batch-size", "8"]) == 2
    assert "other settings or data" in capsys.readouterr().err


def test_eval_refuses_a_dataset_other_than_the_extracted_one(tmp_path, world_features, capsys):
    run = str(tmp_path / "run")
    assert (
        main(
            [
                "align",
                "--shards",
                shards(world_features),
                "--out",
                run,
                "--anchors",
                "8",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    ev = [
        "eval",
        "segmentation",
        "--dataset",
        "world",
        "--split",
        "val",
        "--features",
        str(world_features),
        "--run",
        run,
        "--no-figures",
        "-o",
        "size=8",
    ]
    assert main(ev) == 0
    capsys.readouterr()
    assert main([*ev, "-o", "seed=5"]) == 2  # same ids, other scenes: the masks would not belong to the features
    assert "-o size=8" in capsys.readouterr().err


_MAPPED = """
import ctypes
import numpy as np
from pipe_align.align.data import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                               "fordblks keepcost").split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_host_memory()
a = np.ones(64 << 20, np.uint8)  # 64 MB: above glibc's largest default mmap threshold (32 MB)
mapped = libc.mallinfo2().hblkhd  # bytes in blocks that are their own mapping
del a
kept_free = libc.mallinfo2().fordblks  # freed bytes the heap keeps for reuse
print(applied, mapped, kept_free)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt / mallinfo2 are glibc's")
def test_large_host_blocks_come_from_the_heap_and_stay_for_reuse():
    import os
    import subprocess
    import sys

    def run(**env):
        out = subprocess.run(
            [sys.executable, "-c", _MAPPED], env={**os.environ, **env}, capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] == "True", int(out[1]), int(out[2])

    size = 64 << 20
    kept, mapped_kept, free_kept = run()
    off, mapped_off, free_off = run(PIPE_KEEP_FREED_MEMORY="0")
    user, _, _ = run(MALLOC_TRIM_THRESHOLD_="131072")  # the user's own malloc settings win
    assert kept and not off and not user
    assert mapped_off >= size and free_off < size  # glibc default: its own mapping, unmapped when freed
    assert mapped_kept < size and free_kept >= size  # kept: from the heap, and still there after the free
