"""The apply path (`load`, `pipe segment|classify|search`) computes in the dtype the training stores were extracted
in: its features are the store's rows, not float32 features rounded to float16.

The stores here are extracted on CPU with `--compute-dtype bfloat16` (what `auto` gives on a CUDA GPU), so the CPU
tests see the same difference a GPU extraction makes. The `gpu` test repeats the check with `auto` on CUDA.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipe_align.align.loop import RunConfig
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.encoders.base import resolve_compute_dtype
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store, store_path
from pipe_align.pipelines import api
from pipe_align.pipelines.cli import main
from pipe_align.pipelines.image_index import model_key

SIZE = 16  # world train images
BATCH = 8  # extraction batch: the API is called with the same one, so text batches pad alike
CUDA = torch.cuda.is_available()


def _extract(features: Path, encoder: str, compute_dtype: str, device: str = "cpu", **kw) -> str:
    cfg = ExtractConfig(
        encoder=encoder,
        dataset="world",
        split="train",
        features=str(features),
        device=device,
        options=(("size", SIZE),),
        batch_size=BATCH,
        shard_rows=BATCH,
        compute_dtype=compute_dtype,
        **kw,
    )
    return run_extract(cfg, progress=False).path


def _align(features: Path, out: Path) -> Path:
    cfg = AlignConfig(
        shards=str(features / "world" / "train"),
        out=str(out),
        method="asif",
        run=RunConfig(epochs=1, batch_size=8, val_fraction=0.25),
    )
    return run_align(cfg, progress=False).path


def _stores_and_run(root: Path, dino: str, bert: str, compute_dtype: str, device: str = "cpu"):
    image = open_store(_extract(root / "features", f"hf:{dino}", compute_dtype, device))
    text = open_store(_extract(root / "features", f"hf:{bert}", compute_dtype, device, text="captions"))
    return image, text, _align(root / "features", root / "run")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, tiny_dinov2, tiny_bert):
    """(image store, caption store, run dir): world train extracted in bfloat16 on CPU, a training-free run on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stores_and_run(tmp_path_factory.mktemp("bf16"), tiny_dinov2, tiny_bert, "bfloat16")
    finally:
        torch.set_num_threads(threads)


def _images() -> list:
    world = get_dataset("world", None, "train", size=SIZE)
    return [world.load_image(i) for i in range(SIZE)]


def _valid_tokens(tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """The word tokens inside each row's length (padding differs in width between batches)."""
    keep = torch.arange(tokens.shape[1])[None, :] < length[:, None]
    return tokens[keep]


def _text_rows(store) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    length = torch.from_numpy(store.read("length").astype(np.int64))
    tokens = torch.from_numpy(store.read("tokens").astype(np.float32))
    pooled = torch.from_numpy(store.read("pooled").astype(np.float32))
    return [str(t) for t in store["text"][:]], tokens, length, pooled


# -- the recorded precision is the one the apply path computes in ---------------------------------------------------
def test_apply_features_are_the_rows_of_a_bf16_store(bf16, one_thread):
    """Image and caption features of the API equal the store's rows exactly: same compute dtype, same rounding.
    Computing in float32 instead (what `load` did before) gives other rows, so this comparison can tell the two."""
    image, text, run = bf16
    assert image.layout.encoder["compute_dtype"] == text.layout.encoder["compute_dtype"] == "bfloat16"
    model = api.load(run, device="cpu", batch_size=BATCH)
    rows = model.image_features(_images())
    assert torch.equal(rows.patches, torch.from_numpy(image.read("patches").astype(np.float32)))
    assert torch.equal(rows.cls, torch.from_numpy(image.read("cls").astype(np.float32)))
    texts, tokens, length, pooled = _text_rows(text)
    got = model.text_features(texts)
    assert torch.equal(got.length, length)
    assert torch.equal(_valid_tokens(got.tokens, got.length), _valid_tokens(tokens, length))
    assert torch.equal(got.pooled, pooled)
    assert model.compute_dtypes == {"image": "bfloat16", "text": "bfloat16"}
    assert model.image_encoder.model.dtype == model.text_encoder.model.dtype == torch.bfloat16

    f32 = api.load(run, device="cpu", batch_size=BATCH, compute_dtype="float32")
    assert f32.compute_dtypes == {"image": "float32", "text": "float32"}
    assert f32.image_encoder.model.dtype == torch.float32
    other = f32.image_features(_images())
    assert not torch.equal(other.patches, rows.patches)
    assert (other.patches - rows.patches).abs().max() > 1e-3  # more than float16 rounding: another computation
    assert not torch.equal(_valid_tokens(f32.text_features(texts).tokens, length), _valid_tokens(tokens, length))


def test_a_float32_store_is_applied_in_float32(world_features, tiny_dinov2, one_thread, tmp_path):
    """A store extracted on CPU with `auto` (float32 there, as the shared rule says) is applied in float32."""
    assert resolve_compute_dtype("auto", "cpu") == "float32"
    store = open_store(str(store_path(world_features, "world", "train", f"hf:{tiny_dinov2}")))
    assert store.layout.encoder["compute_dtype"] == "float32"
    run = _align(world_features, tmp_path / "run")
    assert api.load(run, device="cpu").compute_dtypes == {"image": "float32", "text": "float32"}


# -- the rule ---------------------------------------------------------------------------------------------------------
def _spec(modality: str, **recorded) -> api.EncoderSpec:
    return api.EncoderSpec(modality, "x", {"layer": "last"} | recorded, "run.json")


def test_apply_compute_dtype_follows_the_record_and_extractions_rule(monkeypatch):
    """ "store" is the recorded compute dtype; a record from before `compute_dtype` existed means float32 (every store
    was computed in float32 then); "auto" is extraction's own device rule: bfloat16 on a CUDA device with bf16,
    float32 on CPU; a name is taken as given."""
    for modality in ("image", "text"):
        assert api.apply_compute_dtype(_spec(modality, compute_dtype="bfloat16"), "store", "cpu") == "bfloat16"
        assert api.apply_compute_dtype(_spec(modality, compute_dtype="float16"), "store", "cpu") == "float16"
        assert api.apply_compute_dtype(_spec(modality), "store", "cpu") == "float32"
        assert api.apply_compute_dtype(_spec(modality, compute_dtype="bfloat16"), "float32", "cpu") == "float32"
        assert api.apply_compute_dtype(_spec(modality, compute_dtype="float32"), "auto", "cpu") == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert api.apply_compute_dtype(_spec("image", compute_dtype="float32"), "auto", "cuda") == "bfloat16"
    assert api.apply_compute_dtype(_spec("image", compute_dtype="float32"), "store", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert api.apply_compute_dtype(_spec("text", compute_dtype="bfloat16"), "auto", "cuda") == "float32"


def test_apply_auto_is_extractions_rule_not_a_copy(monkeypatch):
    """ "auto" goes through `resolve_compute_dtype`, the function `pipe extract` resolves its dtype with."""
    seen = []

    def rule(name, device):
        seen.append((name, device))
        return "float16"

    monkeypatch.setattr(api, "resolve_compute_dtype", rule)
    assert api.apply_compute_dtype(_spec("image"), "auto", "cpu") == "float16"
    assert seen == [("auto", "cpu")]


def _edit_encoders(run: Path, dest: Path, edit) -> Path:
    shutil.copytree(run, dest)
    meta = json.loads((dest / "run.json").read_text())
    for record in meta["encoders"].values():
        edit(record)
    (dest / "run.json").write_text(json.dumps(meta))
    return dest


def test_a_run_whose_record_predates_compute_dtype_loads_in_float32(bf16, tmp_path, one_thread):
    run = _edit_encoders(bf16[2], tmp_path / "old", lambda r: r.pop("compute_dtype"))
    assert api.load(run, device="cpu").compute_dtypes == {"image": "float32", "text": "float32"}


def test_a_bad_compute_dtype_is_one_line(bf16, tmp_path):
    with pytest.raises(
        PipeError,
        match=r"compute_dtype must be one of store, auto, float32, bfloat16, float16, got "
        r"'fp8'",
    ):
        api.load(bf16[2], device="cpu", compute_dtype="fp8")
    run = _edit_encoders(bf16[2], tmp_path / "bad", lambda r: r.update(compute_dtype="int8"))
    with pytest.raises(PipeError, match=r"run\.json\) has compute_dtype 'int8'") as err:
        api.load(run, device="cpu")
    assert "\n" not in str(err.value) and str(run) in str(err.value)


# -- the commands -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["segment", "classify", "search"])
def test_commands_refuse_a_bad_compute_dtype_before_loading(bf16, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded the run"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    _images()[0].save(folder / "a.png")
    target = [str(folder / "a.png")] if command == "segment" else [str(folder)]
    extra = ["--query", "a house"] if command == "search" else ["--labels", "cat,dog"]
    assert main([command, *target, "--run", str(bf16[2]), *extra, "--compute-dtype", "fp8", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compute-dtype must be one of store, auto,") and "\n" not in err, err


def test_commands_pass_the_compute_dtype_and_search_caches_per_dtype(bf16, tmp_path, capsys, monkeypatch, one_thread):
    """`--compute-dtype` reaches `load` (default: store); the search cache made with one dtype is not reused with
    another, since its embeddings are another computation."""
    loaded = []
    original = api.load

    def recording(*a, **k):
        model = original(*a, **k)
        loaded.append(model.compute_dtypes["image"])
        return model

    monkeypatch.setattr(api, "load", recording)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(_images()[:3]):
        image.save(folder / f"{i}.png")
    run = bf16[2]
    search = ["search", str(folder), "--run", str(run), "--query", "a house", "--no-progress"]
    assert main(search) == 0
    assert "3 encoded now, 0 from the cache" in capsys.readouterr().err
    assert main(search) == 0
    assert "0 encoded now, 3 from the cache" in capsys.readouterr().err
    assert main([*search, "--compute-dtype", "float32"]) == 0
    assert "3 encoded now, 0 from the cache" in capsys.readouterr().err
    assert (
        main(
            [
                "classify",
                str(folder),
                "--run",
                str(run),
                "--labels",
                "a,b",
                "--out",
                str(tmp_path / "c.csv"),
                "--compute-dtype",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    assert loaded == ["bfloat16", "bfloat16", "float32", "float32"]
    key = model_key(original(run, device="cpu"))
    assert key != model_key(original(run, device="cpu", compute_dtype="float32"))


# -- on a GPU only ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_apply_features_equal_an_auto_extraction(tmp_path, tiny_dinov2, tiny_bert):
    """On CUDA `auto` extracts in bfloat16 (where the GPU has it) and the API, with the store's dtype, gives the
    store's rows within bf16 rounding (kernels may differ with the batch shape)."""
    image, text, run = _stores_and_run(tmp_path, tiny_dinov2, tiny_bert, "auto", device="cuda")
    want = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert image.layout.encoder["compute_dtype"] == want
    model = api.load(run, device="cuda", batch_size=BATCH)
    assert model.compute_dtypes == {"image": want, "text": want}
    rows = model.image_features(_images())
    stored = torch.from_numpy(image.read("patches").astype(np.float32))
    assert torch.allclose(rows.patches.cpu(), stored, rtol=2**-7, atol=1e-3), (rows.patches.cpu() - stored).abs().max()
    texts, tokens, length, pooled = _text_rows(text)
    got = model.text_features(texts)
    assert torch.equal(got.length.cpu(), length)
    a, b = _valid_tokens(got.tokens.cpu(), length), _valid_tokens(tokens, length)
    assert torch.allclose(a, b, rtol=2**-7, atol=1e-3), (a - b).abs().max()
    assert torch.allclose(got.pooled.cpu(), pooled, rtol=2**-7, atol=1e-3)
