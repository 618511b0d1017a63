"""`pipe extract` end to end with tiny random encoders: stored tokens, links, resume after SIGKILL, dask, bad input."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.job import cached_encoder
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store, store_path
from pipe_align.pipelines.cli import main

WORLD = (("size", 12),)


def run(cfg_kwargs, **kw):
    base = dict(dataset="world", split="train", options=WORLD, batch_size=4, shard_rows=5)
    return run_extract(ExtractConfig(**(base | cfg_kwargs)), progress=False, **kw)


def tree_digest(path: Path) -> dict[str, str]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_image_store_equals_direct_forward(tmp_path, tiny_dinov2):
    enc_name = f"hf:{tiny_dinov2}"
    summary = run({"encoder": enc_name, "features": str(tmp_path)})
    st = open_store(summary.path, modality="image")
    assert st.verify() == [] and st.layout.count == 12 and st.layout.num_shards == 3
    ds = get_dataset("world", None, "train", size=12)
    enc = cached_encoder(enc_name, "last", None, 64, "cpu")
    pixels = enc.preprocess([ds.load_image(i) for i in range(12)], resize=st.layout.resize)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(tiny_dinov2)(pixel_values=pixels).last_hidden_state
    h, w = st.layout.grid
    assert hidden.shape[1] == 1 + h * w and st["patches"].shape == (12, h * w, hidden.shape[2])
    np.testing.assert_allclose(st["patches"][:].astype(np.float32), hidden[:, 1:].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(st["cls"][:].astype(np.float32), hidden[:, 0].numpy(), atol=2e-3, rtol=2e-3)
    assert list(st["ids"][:]) == [r.id for r in ds.images()]
    np.testing.assert_array_equal(st["labels"][:], [r.label for r in ds.images()])
    assert st.attrs["encoder"]["model_id"] and st.attrs["extract"]["encoder"] == enc_name


def test_caption_and_prompt_stores(tmp_path, tiny_bert):
    enc_name = f"hf:{tiny_bert}"
    cap = open_store(run({"encoder": enc_name, "features": str(tmp_path), "limit": 6}).path, modality="text")
    ds = get_dataset("world", None, "train", size=12)
    expected = [c for c in ds.captions() if c.item < 6]
    assert list(cap["text"][:]) == [c.text for c in expected]
    np.testing.assert_array_equal(cap["item"][:], [c.item for c in expected])
    enc = cached_encoder(enc_name, "last", None, 64, "cpu")
    tokens, length, pooled = enc.encode([c.text for c in expected])
    np.testing.assert_array_equal(cap["length"][:], length.numpy())
    np.testing.assert_allclose(cap["tokens"][:].astype(np.float32), tokens.numpy(), atol=2e-3, rtol=2e-3)
    assert np.all(cap["tokens"][:][np.arange(cap.layout.tokens)[None, :] >= length.numpy()[:, None]] == 0)

    prompts = open_store(run({"encoder": enc_name, "features": str(tmp_path), "text": "prompts"}).path)
    classes, templates = prompts.attrs["classes"], prompts.attrs["templates"]
    assert prompts.path.name.endswith(".prompts.zarr") and prompts.layout.count == len(classes) * len(templates)
    np.testing.assert_array_equal(prompts["item"][:], np.repeat(np.arange(len(classes)), len(templates)))
    assert prompts["text"][len(templates)] == templates[0].replace("{}", classes[1])


SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from pipe_align.extract.store import FeatureStore
    write = FeatureStore.write_shard
    def slow(self, *a, **k):
        write(self, *a, **k)
        time.sleep(0.3)
    FeatureStore.write_shard = slow
    from pipe_align.pipelines.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_resume_after_sigkill_is_byte_identical(tmp_path, tiny_dinov2):
    args = [
        "extract",
        "--encoder",
        f"hf:{tiny_dinov2}",
        "--dataset",
        "world",
        "-o",
        "size=40",
        "--shard-rows",
        "4",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    ref = tmp_path / "ref"
    assert main([*args, "--features", str(ref)]) == 0
    killed = tmp_path / "killed"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), *args, "--features", str(killed)])
    store_dir = killed / "world" / "train"
    deadline = time.time() + 120
    while time.time() < deadline:
        stores = list(store_dir.glob("*.zarr")) if store_dir.exists() else []
        if stores and (done := open_store(stores[0], require_complete=False)["done"][:]).sum() >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = open_store(stores[0], require_complete=False)
    done = st["done"][:]
    assert 0 < done.sum() < 40 and not st.complete, "the run must be killed mid-way"
    with pytest.raises(Exception, match="incomplete"):
        open_store(stores[0])
    assert main([*args, "--features", str(killed)]) == 0
    assert tree_digest(killed) == tree_digest(ref)
    assert main([*args, "--features", str(killed)]) == 0  # complete: nothing to do


def test_two_process_dask_equals_one_process(tmp_path, tiny_dinov2):
    enc_name = f"hf:{tiny_dinov2}"
    one = open_store(run({"encoder": enc_name, "features": str(tmp_path / "one")}).path)
    two = open_store(run({"encoder": enc_name, "features": str(tmp_path / "two")}, cluster="local:2").path)
    for name in ("ids", "labels", "done"):
        np.testing.assert_array_equal(one[name][:], two[name][:])
    for name in ("patches", "cls"):  # thread counts differ between the runs: allow fp16 rounding of the GEMMs
        np.testing.assert_allclose(one[name][:].astype(np.float32), two[name][:].astype(np.float32), atol=2e-3)
    assert two.verify() == []


def test_corrupt_image_is_skipped_or_fatal_with_strict(tmp_path, tiny_dinov2, capsys):
    from pipe_align.extract.datasets import write_world

    write_world(tmp_path / "data", "train", size=6, seed=0, layouts=("voc",))
    jpgs = sorted((tmp_path / "data").rglob("JPEGImages/*"))
    jpgs[2].write_bytes(b"not an image")
    args = [
        "extract",
        "--encoder",
        f"hf:{tiny_dinov2}",
        "--dataset",
        "voc",
        "--root",
        str(tmp_path / "data"),
        "--split",
        "train",
        "--no-progress",
    ]
    assert main([*args, "--features", str(tmp_path / "f"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and jpgs[2].stem in err
    assert (
        not list((tmp_path / "f").rglob("*.zarr"))
        or not open_store(next((tmp_path / "f").rglob("*.zarr")), require_complete=False).complete
    )
    assert main([*args, "--features", str(tmp_path / "g")]) == 0
    st = open_store(next((tmp_path / "g").rglob("*.zarr")))
    assert st.attrs["skipped"] == [jpgs[2].stem] and jpgs[2].stem in capsys.readouterr().out
    assert st.verify() == []


def test_truncated_files_are_skipped_and_listed(tmp_path, tiny_dinov2, monkeypatch):
    """Truncated bytes are a corrupt image: one JPEG cut by the reader's decode (UnreadableImage), one PNG that a
    reader hands over lazily so that PIL's OSError surfaces in the runner's own decode. Both rows are skipped."""
    from pipe_align.extract.datasets import write_world
    from pipe_align.extract.datasets.voc import VOCSegmentation

    write_world(tmp_path / "data", "train", size=6, seed=0, layouts=("voc",))
    jpg = sorted((tmp_path / "data").rglob("JPEGImages/*"))[1]
    jpg.write_bytes(jpg.read_bytes()[:-2000])
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    png = tmp_path / "cut.png"
    Image.fromarray(noise).save(png)
    png.write_bytes(png.read_bytes()[:-2000])
    load = VOCSegmentation.load_image
    monkeypatch.setattr(VOCSegmentation, "load_image", lambda self, i: Image.open(png) if i == 4 else load(self, i))
    ids = [r.id for r in get_dataset("voc", tmp_path / "data", "train").images()]
    cfg = ExtractConfig(
        encoder=f"hf:{tiny_dinov2}",
        dataset="voc",
        root=str(tmp_path / "data"),
        split="train",
        features=str(tmp_path / "f"),
        batch_size=4,
    )
    summary = run_extract(cfg, progress=False)
    assert [rid for rid, _ in summary.skipped] == [jpg.stem, ids[4]] and "truncated" in summary.skipped[1][1]
    st = open_store(summary.path)
    assert st.attrs["skipped"] == [jpg.stem, ids[4]] and st.verify() == []
    assert list(st["ids"][:]) == ids and st["skipped"][:].tolist() == [i in (1, 4) for i in range(6)]


def test_reader_bug_fails_the_run_instead_of_skipping_the_row(tmp_path, tiny_dinov2, monkeypatch):
    """Only unreadable images are skipped: any other exception from a reader is a bug and must not pass as a
    "corrupt image" (the run fails with its traceback; the store is left incomplete)."""
    from pipe_align.extract.datasets.world import World

    load = World.load_image

    def buggy(self, i):
        if i == 2:
            raise KeyError("annotation 'x2' missing")
        return load(self, i)

    monkeypatch.setattr(World, "load_image", buggy)
    with pytest.raises(KeyError, match="x2"):
        run({"encoder": f"hf:{tiny_dinov2}", "features": str(tmp_path)})
    assert not open_store(next(tmp_path.rglob("*.zarr")), require_complete=False).complete


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--dataset", "nope"], "world"),
        (["--dataset", "voc", "--root", "/no/such/dir"], "/no/such/dir"),
        (["--dataset", "world", "--batch-size", "0"], "--batch-size"),
        (["--dataset", "world", "--dtype", "float64"], "--dtype"),
        (["--dataset", "world", "--device", "tpu"], "--device"),
        (["--dataset", "world", "--option", "size"], "--option"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_dinov2, capsys, extra, needle):
    code = main(["extract", "--encoder", f"hf:{tiny_dinov2}", "--features", str(tmp_path), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and needle in err
    assert not list(tmp_path.rglob("*.zarr"))


def test_unknown_encoder_features_file_and_other_encoder(tmp_path, tiny_dinov2, capsys):
    base = ["extract", "--dataset", "world", "-o", "size=4", "--no-progress"]
    assert main([*base, "--encoder", "nope", "--features", str(tmp_path)]) == 2
    assert "dinov2-small" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base, "--encoder", f"hf:{tiny_dinov2}", "--features", str(tmp_path / "file")]) == 2
    assert "file" in capsys.readouterr().err
    # a store written with other settings, or by another encoder, is refused rather than overwritten
    feats = tmp_path / "f"
    assert main([*base, "--encoder", f"hf:{tiny_dinov2}", "--features", str(feats)]) == 0
    assert main([*base, "--encoder", f"hf:{tiny_dinov2}", "--features", str(feats), "--image-size", "84"]) == 2
    assert "differs in" in capsys.readouterr().err
    other = tmp_path / "other-model"
    os.symlink(tiny_dinov2, other)
    store = next(feats.rglob("*.zarr"))
    os.rename(store, store_path(feats, "world", "train", f"hf:{other}"))
    assert main([*base, "--encoder", f"hf:{other}", "--features", str(feats)]) == 2
    assert "encoder" in capsys.readouterr().err


def test_info_and_verify_commands(tmp_path, tiny_dinov2, capsys):
    path = run({"encoder": f"hf:{tiny_dinov2}", "features": str(tmp_path)}).path
    capsys.readouterr()
    assert main(["info", path]) == 0 and "complete" in capsys.readouterr().out
    assert main(["verify", path]) == 0
    st = open_store(path)
    st["cls"][0] = np.full(st.layout.dim, np.nan, np.float16)
    assert main(["verify", path]) == 1 and "non-finite" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "none.zarr")]) == 2


def test_store_is_not_resumed_with_other_dataset_options(tmp_path, tiny_dinov2, capsys):
    base = [
        "extract",
        "--encoder",
        f"hf:{tiny_dinov2}",
        "--dataset",
        "world",
        "--features",
        str(tmp_path),
        "-o",
        "size=4",
        "--no-progress",
    ]
    assert main([*base, "-o", "seed=0"]) == 0
    capsys.readouterr()
    assert main([*base, "-o", "seed=5"]) == 2  # another world: neither resumed into nor reported as done
    assert "differs in origin" in capsys.readouterr().err
