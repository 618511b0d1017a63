"""Hostile and unlucky input to `pipe segment|classify|search` and the `load()` API (docs/guarantees.md, "Apply
surface"). Each test failed on the code before the change that made it pass: colliding output names, a reused
--out folder, invisible queries, tensors that are not images, a damaged search cache, a full disk or file-size limit
while writing outputs, and option values that were ignored or accepted."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import safe_open, save_file

from pipe_align.extract.errors import PipeError
from pipe_align.pipelines import api
from pipe_align.pipelines.apply_cmd import out_names
from pipe_align.pipelines.cli import main
from pipe_align.pipelines.image_index import folder_embeddings
from tests.helpers import one_line_error
from tests.test_apply import train, val_images

LABELS = ["ball", "star"]


@pytest.fixture(scope="module")
def pal_run(tmp_path_factory, world_features) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(world_features, tmp_path_factory.mktemp("hostile") / "pal", "pal", anchors=16)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(pal_run) -> api.AlignedModel:
    return api.load(pal_run, device="cpu")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Five world val images, one in a subfolder."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, img in enumerate(val_images()[:5]):
        img.save(images / ("sub" if i == 4 else "") / f"img{i}.png")
    return images


def segment(*args) -> int:
    return main(["segment", *map(str, args), "--no-progress"])


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- 1. output names ------------------------------------------------------------------------------------------------
def test_output_names_are_unique_and_never_take_another_inputs_name():
    assert out_names([Path("d1/a.png"), Path("d2/a.png"), Path("a-2.png")]) == ["a", "a-3", "a-2"]
    assert out_names([Path("x/A.png"), Path("y/a.jpg")]) == ["A", "a-2"]  # one file on a case-insensitive disk
    rng = random.Random(0)
    for _ in range(500):
        stems = [rng.choice(["a", "A", "a-2", "a-3", "A-2", "b", "a-2-2"]) for _ in range(rng.randint(1, 9))]
        paths = [Path(f"d{i}") / f"{s}.png" for i, s in enumerate(stems)]
        names = out_names(paths)
        assert len({n.casefold() for n in names}) == len(names), (stems, names)
        inputs = {s.casefold() for s in stems}
        for i, (stem, name) in enumerate(zip(stems, names)):
            if all(t.casefold() != stem.casefold() for t in stems[:i]):
                assert name == stem  # the first image of a stem keeps it
            else:  # a later one gets a suffix that is no input's own stem
                assert name.startswith(f"{stem}-") and name.casefold() not in inputs, (stems, names)
        assert out_names(paths) == names


def test_segment_keeps_every_output_of_images_with_the_same_name(pal_run, model, tmp_path, one_thread):
    inputs = [tmp_path / "d1" / "a.png", tmp_path / "d2" / "a.png", tmp_path / "a-2.png"]
    for path, img in zip(inputs, val_images()[:3]):
        path.parent.mkdir(exist_ok=True)
        img.save(path)
    out = tmp_path / "out"
    assert segment(*inputs, "--run", pal_run, "--labels", ",".join(LABELS), "--out", out) == 0
    assert sorted(files(out)) == [
        "a-2.labels.png",
        "a-2.overlay.png",
        "a-3.labels.png",
        "a-3.overlay.png",
        "a.labels.png",
        "a.overlay.png",
        "labels.txt",
    ]
    expected = [model.segment(path, LABELS).labels.numpy() for path in inputs]
    for i, stem in enumerate(["a", "a-3", "a-2"]):
        with Image.open(out / f"{stem}.labels.png") as png:
            got = np.asarray(png)
        # each output is its own input's segmentation (the batched and the single-image forward may split a near-tie
        # at a few upsampled pixels differently), and further from every other input's
        wrong = [(got != e).mean() for e in expected]
        assert wrong[i] < 1e-3 and all(w > wrong[i] for j, w in enumerate(wrong) if j != i), (stem, wrong)


# -- 2. a reused --out folder ---------------------------------------------------------------------------------------
def test_out_folder_with_other_labels_is_refused(pal_run, tmp_path, capsys, one_thread):
    image = tmp_path / "x.png"
    val_images()[0].save(image)
    out = tmp_path / "out"
    run = ["--run", pal_run, "--out", out]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    assert segment(tmp_path / "bad.png", *run, "--labels", "ball,star") == 2
    assert "unreadable image" in one_line_error(capsys, 2) and not out.exists()  # no labels.txt before an image is read
    assert segment(image, *run, "--labels", "ball,star") == 0
    assert (out / "labels.txt").read_text() == "0\tbackground\n1\tball\n2\tstar\n"
    before = files(out)
    capsys.readouterr()
    for other in (
        ["--labels", "star,ball"],
        ["--labels", "ball,star,tree"],
        [
            "--labels",
            "ball,star",
            "--background",
            "",
        ],
    ):
        assert segment(image, *run, *other) == 2, other
        err = one_line_error(capsys, 2)
        assert f"--out {out}" in err and "background, ball, star" in err and "ball, star" in err, err
        assert files(out) == before  # labels.txt and the label maps it names are left as they were
    assert segment(image, *run, "--labels", " ball, star") == 0  # the same labels: the folder is reused

    (out / "labels.txt").write_text("this is not an index\n")
    assert segment(image, *run, "--labels", "ball,star") == 2
    assert "labels.txt is not one written by `pipe segment`" in one_line_error(capsys, 2)


def test_an_output_never_replaces_an_input_image(pal_run, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    (tmp_path / "in").mkdir()
    out.mkdir()
    val_images()[1].save(tmp_path / "in" / "c.png")
    val_images()[2].save(out / "c.overlay.png")  # an input that `c.png`'s overlay would overwrite
    before = (out / "c.overlay.png").read_bytes()
    assert (
        segment(tmp_path / "in" / "c.png", out / "c.overlay.png", "--run", pal_run, "--labels", "ball", "--out", out)
        == 2
    )
    assert "would replace that input image" in one_line_error(capsys, 2)
    assert (out / "c.overlay.png").read_bytes() == before


# -- 3. invisible queries -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", ["\u200b", "\u200b\u200d\ufeff", "\x07\x1b", "\u200b \u2060"])
def test_a_query_without_a_visible_character_is_refused(pal_run, model, folder, capsys, query):
    assert (
        main(["search", str(folder), "--run", str(pal_run), "--query", "a red ball", "--query", query, "--no-progress"])
        == 2
    )
    err = one_line_error(capsys, 2)
    assert err.startswith(f"error: --query {query!r}") and "no visible character" in err
    with pytest.raises(PipeError, match="text 1 is empty"):
        model.encode_text(["a red ball", query])


# -- 4. the API -----------------------------------------------------------------------------------------------------
def test_tensors_that_are_not_images_are_refused(model, one_thread):
    u8 = torch.from_numpy(np.array(val_images()[0])).permute(2, 0, 1).contiguous()
    ref = model.encode_image(u8)
    assert torch.equal(model.encode_image(u8.to(torch.int64)), ref)  # integers 0..255 are pixels in any dtype
    too_big, negative = u8.to(torch.int32), u8.to(torch.int16)
    too_big[0, 0, 0], negative[1, 2, 3] = 300, -1  # a cast to uint8 would read 44 and 255
    cases = [
        (too_big, r"values must lie in 0\.\.255, got \d+\.\.300"),
        (negative, r"0\.\.255, got -1\.\."),
        (u8 > 128, "bool image tensor"),
        (torch.zeros(3, 0, 0, dtype=torch.uint8), "at least one pixel"),
        (torch.zeros(5, 0), "at least one pixel"),
        (Image.new("RGB", (0, 0)), "image of size 0x0"),
        (torch.zeros(0, 3, 8, 8), "no images given"),
    ]
    for image, match in cases:
        with pytest.raises(PipeError, match=match):
            model.encode_image(image)
    with pytest.raises(PipeError, match=r"images\[1\]: torch.bool image tensor"):
        model.encode_image([u8, u8 > 128])  # an in-memory image is named by its position
    with pytest.raises(PipeError, match="bool image tensor"):
        model.segment(u8 > 128, LABELS)


def test_bad_arguments_name_themselves(model, one_thread):
    image = val_images()[3]
    for top in (-1, 0, True, 1.5):
        with pytest.raises(PipeError, match=r"anchor_maps: top must be an integer >= 1"):
            model.anchor_maps(image, top=top)
    seg = model.segment(image, LABELS)  # names: background, ball, star
    for label in ("unknown", -1, 3, True):  # -1 sliced an empty map before; True read as 1
        with pytest.raises(PipeError, match=r"score_map: label .* \(background, ball, star\) or their indices 0..2"):
            seg.score_map(label)
    assert torch.equal(seg.score_map(2), seg.score_map("star"))
    for kwargs, match in (
        ({"threshold": math.nan}, "threshold must be a finite number"),
        ({"threshold": -math.inf}, "threshold must be a finite number"),
        ({"bias": math.inf}, "bias must be a finite number"),
        ({"bias": -0.1}, "bias must be >= 0"),
        ({"bias": "0.1"}, "bias must be a number"),
        ({"bias": 0.0, "background": None}, "needs a background label"),
    ):
        with pytest.raises(PipeError, match=match):
            model.segment(image, LABELS, **kwargs)
    for labels, background, match in (
        (["ball", "\u200b"], "background", "no visible character"),
        (["ball", "a\nb"], "background", "line break or control character"),
        (["ball", "a\u2028b"], "background", "line break or control character"),
        (LABELS, "\ufeff", "background: label '\\\\ufeff' has no visible character"),
    ):
        with pytest.raises(PipeError, match=match):
            model.segment(image, labels, background=background)


# -- 5. the search cache --------------------------------------------------------------------------------------------
def cache_of(run: Path, folder: Path) -> Path:
    """The cache file `pipe search` wrote for `folder` (its metadata names the folder)."""
    for path in sorted((run / "cache").glob("search-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if json.loads(f.metadata()["index"])["folder"] == str(folder.resolve()):
                return path
    raise AssertionError(f"no cache for {folder}")


def signed(meta: dict, emb: torch.Tensor) -> dict[str, str]:
    """Metadata with a valid checksum (docs/apply.md: sha256 of the index without its `sha256` entry as JSON with
    sorted keys, then the float32 rows' bytes), so that only the other checks can find the damage."""
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    sha = hashlib.sha256(json.dumps(rest, sort_keys=True).encode() + emb.float().contiguous().numpy().tobytes())
    return {"index": json.dumps(rest | {"sha256": sha.hexdigest()})}


def flip_a_bit(path: Path, meta: dict, emb: torch.Tensor) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8 : 8 + n])["embeddings"]["data_offsets"][0]
    raw[start + 3] ^= 0xC0  # the sign and the top exponent bit of the first float: a "cosine" of about +-1e37
    path.write_bytes(bytes(raw))


def nan_row(path, meta, emb):
    emb[0, 0] = math.nan
    save_file({"embeddings": emb}, str(path), metadata=signed(meta, emb))


def scaled_row(path, meta, emb):
    emb[1] *= 3
    save_file({"embeddings": emb}, str(path), metadata=signed(meta, emb))


def no_metadata(path, meta, emb):
    save_file({"embeddings": emb}, str(path))


def index_not_a_dict(path, meta, emb):
    save_file({"embeddings": emb}, str(path), metadata={"index": json.dumps([meta])})


def flat_embeddings(path, meta, emb):
    save_file({"embeddings": emb.flatten()}, str(path), metadata=signed(meta, emb.flatten()))


def files_not_lists(path, meta, emb):
    meta["files"] = [7] * len(meta["files"])
    save_file({"embeddings": emb}, str(path), metadata=signed(meta, emb))


def no_checksum(path, meta, emb):  # as written before the checksum existed
    meta.pop("sha256", None)
    save_file({"embeddings": emb}, str(path), metadata={"index": json.dumps(meta)})


def garbage(path, meta, emb):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")


DAMAGE = (
    flip_a_bit,
    nan_row,
    scaled_row,
    no_metadata,
    index_not_a_dict,
    flat_embeddings,
    files_not_lists,
    no_checksum,
    garbage,
)


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_search_cache_is_rebuilt_and_said(model, folder, damage, one_thread):
    paths = sorted(folder.rglob("*.png"))
    fresh = model.encode_image(paths)
    first = folder_embeddings(model, folder)
    assert first.encoded == 5 and first.cache_problem is None and first.cache is not None
    with safe_open(str(first.cache), "pt") as f:
        meta, emb = json.loads(f.metadata()["index"]), f.get_tensor("embeddings").clone()
    damage(first.cache, meta, emb)
    again = folder_embeddings(model, folder)
    assert again.cache_problem and again.encoded == 5, again.cache_problem  # nothing taken from the damaged file
    assert again.paths == paths and torch.allclose(again.embeddings, fresh, atol=1e-6)
    reused = folder_embeddings(model, folder)  # rewritten whole: used again
    assert reused.cache_problem is None and reused.encoded == 0
    assert torch.allclose(reused.embeddings, fresh, atol=1e-6)


def test_search_says_it_rebuilt_a_damaged_cache(pal_run, model, folder, capsys, one_thread):
    args = ["search", str(folder), "--run", str(pal_run), "--query", "a red ball", "--top-k", "5", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    path = cache_of(pal_run, folder)
    with safe_open(str(path), "pt") as f:
        meta, emb = json.loads(f.metadata()["index"]), f.get_tensor("embeddings").clone()
    flip_a_bit(path, meta, emb)
    assert main(args) == 0
    out = capsys.readouterr()
    damaged = [line for line in out.err.splitlines() if "damaged" in line]
    assert damaged == [f"search cache {path} was damaged (checksum mismatch); encoded the folder again"]
    assert "5 images: 5 encoded now, 0 from the cache" in out.err
    paths = sorted(folder.rglob("*.png"))
    best = (model.encode_text("a red ball") @ model.encode_image(paths).T)[0].topk(5)
    shown = [line.split() for line in out.out.splitlines()[1:]]
    assert [float(s[1]) for s in shown] == pytest.approx(best.values.tolist(), abs=1e-4)


# -- 6. a full disk or a file-size limit while writing outputs ------------------------------------------------------
def test_disk_full_while_writing_outputs_is_one_line(pal_run, tmp_path, capsys, monkeypatch, one_thread):
    """Writes fail with ENOSPC after some bytes (the rest of a write lands, as on a real disk): one line naming the
    file, and every output file under its name is whole, from this run or the one before."""
    names = ["a.png", "b.png"]
    for name, img in zip(names, val_images()[:2]):
        img.save(tmp_path / name)
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = [*(tmp_path / n for n in names), "--run", pal_run, "--labels", "ball,star"]
    assert segment(*args, "--out", out) == 0
    old = files(out)
    for name, img in zip(names, val_images()[2:4]):  # other images: new outputs differ from the old ones
        img.save(tmp_path / name)
    assert segment(*args, "--out", ref) == 0
    new = files(ref)
    assert all(new[k] != old[k] for k in new if k.endswith(".overlay.png"))
    capsys.readouterr()

    real, room = os.write, [len(new["labels.txt"]) + len(new["a.overlay.png"]) + 100]

    def full_disk(fd: int, data) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[: room[0]]))
        room[0] -= n
        return n

    monkeypatch.setattr(os, "write", full_disk)
    assert segment(*args, "--out", out) == 2
    monkeypatch.undo()
    err = one_line_error(capsys, 2)
    assert err.startswith(f"error: {out / 'a.labels.png'}: cannot be written: No space left on device"), err
    assert "free space" in err, err
    now = files(out)
    assert sorted(now) == sorted(old)  # no temporary file left behind
    assert now["a.overlay.png"] == new["a.overlay.png"]  # written whole before the disk filled
    assert now["a.labels.png"] == old["a.labels.png"] and now["b.overlay.png"] == old["b.overlay.png"]


def test_file_size_limit_while_writing_outputs_is_one_line(pal_run, tmp_path):
    """A real RLIMIT_FSIZE (EFBIG) in a child process: labels.txt fits, the overlay (written next) does not."""
    image, out = tmp_path / "x.png", tmp_path / "out"
    val_images()[0].save(image)
    limit, hard = 4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    code = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {hard}));"
        "from pipe_align.pipelines.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "segment",
            str(image),
            "--run",
            str(pal_run),
            "--labels",
            "ball,star",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert "\n" not in err and err.startswith(f"error: {out / 'x.overlay.png'}: cannot be written: File too large"), err
    assert "file-size limit" in err
    assert sorted(files(out)) == ["labels.txt"]  # nothing half-written under an output's name, no temporary file


# -- 7. option values -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value",
    [
        ("--background-threshold", "nan"),
        ("--background-threshold", "-inf"),
        ("--background-bias", "inf"),
        ("--background-bias", "-0.5"),
        ("--labels", "ball,\u200b"),
        ("--labels", "ball,a\nb"),
        ("--labels", "ball,\x07"),
        ("--background", "\u200b\u200b"),
        ("--background", "sky\nline"),
    ],
)
def test_bad_segment_option_values_are_one_line(pal_run, tmp_path, capsys, option, value):
    image, out = tmp_path / "x.png", tmp_path / "out"
    val_images()[0].save(image)
    labels = value if option == "--labels" else "ball"
    extra = [] if option == "--labels" else [option, value]
    assert segment(image, "--run", pal_run, "--labels", labels, "--out", out, *extra) == 2
    err = one_line_error(capsys, 2)
    assert err.startswith(f"error: {option}"), err
    assert not out.exists()
