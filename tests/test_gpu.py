"""The GPU paths, checked on CPU where that is possible and marked `gpu` (skipped without CUDA) where it is not:
compute dtype of extraction (bf16 vs float32 features, the store records it, stores are never mixed), SDPA vs eager
attention, every Triton autotune tile against the reference (in the interpreter), and `bench/gpu.sh --tiny`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipe_align.extract.encoders import load_encoder
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
WORLD = (("size", 8),)
BF16_MIN_COSINE = 0.999  # the bar for what bf16 compute may lose against float32, per stored token


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _extract(features: Path, encoder: str, compute_dtype: str, device: str = "cpu", **kw) -> str:
    cfg = ExtractConfig(
        encoder=encoder,
        dataset="world",
        split="train",
        features=str(features),
        options=WORLD,
        batch_size=3,
        shard_rows=4,
        device=device,
        compute_dtype=compute_dtype,
        **kw,
    )
    return run_extract(cfg, progress=False).path


def _token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(-1, a.shape[-1]), b.astype(np.float64).reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- compute dtype ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_dinov2", "tiny_bert"])
def test_bf16_compute_keeps_every_stored_token_close_to_float32(tmp_path, model, request):
    """What bf16 compute loses against float32, on every stored token (padding excluded): cosine >= 0.999."""
    encoder = f"hf:{request.getfixturevalue(model)}"
    text = {"text": "captions"} if model == "tiny_bert" else {}
    f32 = open_store(_extract(tmp_path / "f32", encoder, "float32", **text))
    bf16 = open_store(_extract(tmp_path / "bf16", encoder, "bfloat16", **text))
    assert f32.layout.encoder["compute_dtype"] == "float32" and bf16.layout.encoder["compute_dtype"] == "bfloat16"
    if model == "tiny_dinov2":
        pairs = [(f32.read("patches"), bf16.read("patches")), (f32.read("cls"), bf16.read("cls"))]
    else:
        length = f32.read("length")
        assert (length == bf16.read("length")).all()
        valid = np.arange(f32.layout.tokens)[None, :] < length[:, None]
        pairs = [(f32.read("tokens")[valid], bf16.read("tokens")[valid]), (f32.read("pooled"), bf16.read("pooled"))]
    for a, b in pairs:
        assert not np.array_equal(a, b)  # bf16 did run: the features moved
        cos = _token_cosines(a, b)
        assert cos.min() >= BF16_MIN_COSINE, f"worst token cosine {cos.min():.6f}"


def test_stores_of_another_compute_dtype_are_never_mixed(tmp_path, tiny_dinov2):
    """A store computed in float32 is not resumed or reused by a bf16 run (one-line error naming compute_dtype), and
    evaluation refuses a store computed in another dtype than the run's training store."""
    from pipe_align.evaluate.context import check_encoder

    encoder = f"hf:{tiny_dinov2}"
    path = _extract(tmp_path, encoder, "float32")
    with pytest.raises(PipeError, match="encoder compute_dtype float32 vs bfloat16") as err:
        _extract(tmp_path, encoder, "bfloat16")
    assert "\n" not in str(err.value)
    store = open_store(path)
    trained_bf16 = {
        "image_encoder": encoder,
        "image_store": {"encoder": dict(store.layout.encoder, compute_dtype="bfloat16")},
    }
    with pytest.raises(PipeError, match="compute_dtype='float32' but run r was trained on compute_dtype='bfloat16'"):
        check_encoder(store, trained_bf16, "image", "r")
    check_encoder(
        store, {"image_encoder": encoder, "image_store": {"encoder": dict(store.layout.encoder)}}, "image", "r"
    )


def test_store_written_before_compute_dtype_resumes_as_float32(tmp_path, tiny_dinov2):
    """Stores from before the field was recorded were all computed in float32: a float32 run resumes them."""
    import json

    encoder = f"hf:{tiny_dinov2}"
    path = Path(_extract(tmp_path, encoder, "float32", limit=6))
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["encoder"]["compute_dtype"]
    meta["attributes"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(meta))
    assert _extract(tmp_path, encoder, "float32", limit=6) == str(path)
    with pytest.raises(PipeError, match="compute_dtype float32 vs bfloat16"):
        _extract(tmp_path, encoder, "bfloat16", limit=6)


def test_compute_dtype_auto_and_bad_names():
    from pipe_align.extract.encoders.base import resolve_compute_dtype

    assert resolve_compute_dtype("auto", "cpu") == "float32"
    if CUDA:
        want = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        assert resolve_compute_dtype("auto", "cuda") == want
    with pytest.raises(PipeError, match="--compute-dtype must be auto, float32, bfloat16, float16"):
        resolve_compute_dtype("fp8", "cpu")
    with pytest.raises(PipeError, match="--compute-dtype"):
        run_extract(
            ExtractConfig(
                encoder="minilm", dataset="world", split="train", features="/nonexistent", compute_dtype="half"
            ),
            progress=False,
        )


def test_cli_compute_dtype(tmp_path, tiny_dinov2, capsys):
    from pipe_align.pipelines.cli import main

    args = [
        "extract",
        "--encoder",
        f"hf:{tiny_dinov2}",
        "--dataset",
        "world",
        "--features",
        str(tmp_path),
        "-o",
        "size=4",
        "--batch-size",
        "2",
    ]
    assert main([*args, "--compute-dtype", "half"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --compute-dtype must be") and err.count("\n") == 1
    assert main([*args, "--compute-dtype", "bfloat16"]) == 0
    store = open_store(next(tmp_path.rglob("*.zarr")))
    assert store.layout.encoder["compute_dtype"] == "bfloat16"


@pytest.mark.parametrize("model", ["tiny_dinov2", "tiny_bert"])
def test_sdpa_and_eager_attention_give_the_same_features(model, request):
    folder = request.getfixturevalue(model)
    sdpa = load_encoder(f"hf:{folder}", attention="sdpa")
    eager = load_encoder(f"hf:{folder}", attention="eager")
    assert sdpa.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    if model == "tiny_dinov2":
        pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
        outs = [enc.encode(pixels) for enc in (sdpa, eager)]
    else:
        texts = ["a red circle", "two small dogs near the big tree", "sky"]  # padded rows: the mask matters
        outs = [enc.encode(texts) for enc in (sdpa, eager)]
    for a, b in zip(*outs):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_unknown_attention_is_one_line(tiny_bert):
    with pytest.raises(PipeError, match="attention must be one of sdpa, eager"):
        load_encoder(f"hf:{tiny_bert}", attention="flash")


# --- Triton autotune tiles ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not (INTERPRET and _has_triton()), reason="runs under TRITON_INTERPRET=1 (see the next test)")
def test_every_tile_matches_reference_interp(monkeypatch):
    """Each tile the autotuner may pick computes the same profiles and gradients (odd D, K, T; 2 backward chunks)."""
    from pipe_align.align import kernel_triton
    from tests.test_kernel import _check_triton

    monkeypatch.setattr(kernel_triton, "BWD_CHUNK_ELEMS", 2 * 70 * 150)
    for i in range(len(kernel_triton.TILES)):
        monkeypatch.setattr(kernel_triton, "PINNED", i)
        _check_triton(torch.float32, 2e-5, "cpu")  # the tiles' masking and boundaries do not depend on the dtype


@pytest.mark.skipif(INTERPRET or not _has_triton(), reason="needs triton; already inside the interpreter run")
def test_every_tile_via_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(Path(__file__)),
        "-k",
        "every_tile_matches_reference_interp",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr


def test_autotune_bucket_of_token_counts():
    from pipe_align.align.kernel_triton import _t_bucket

    assert [_t_bucket(t) for t in (1, 16, 17, 32, 33, 257)] == [16, 16, 32, 32, 64, 512]


# --- the prepared GPU check ------------------------------------------------------------------------------------


ROWS = (  # what issue 14 asks the table for
    "pytest-gpu",  # `pytest -m gpu`
    "triton-err-fp32",
    "triton-err-bf16",
    "triton-err-fp16",  # max error against the reference, per token dtype
    "triton-vs-matmul",  # Triton TFLOP/s against the measured bf16 matmul rate
    "extract-image",
    "extract-text",  # `pipe extract` rows/s against a bare forward loop of the same model
    "mfu-image",
    "mfu-text",  # the bare loop's model-FLOP utilisation against the GPU's bf16 peak
    "epoch-resident",  # one PAL epoch, tokens on the device, against its FLOP floor
    "epoch-streamed",  # the same epoch streamed from the Zarr store, against resident
)


def test_gpu_script_tiny_prints_every_row():
    """`bash bench/gpu.sh --tiny` runs the whole GPU check on CPU with tiny sizes and prints every row."""
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| check") :]
    for row in ROWS:
        line = next((ln for ln in table.splitlines() if ln.startswith(f"| {row} ")), None)
        assert line is not None, f"row {row!r} missing:\n{table}"
        assert "crashed" not in line, line


# --- on a GPU only -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("model", ["tiny_dinov2", "tiny_bert"])
def test_cuda_extraction_equals_cpu(tmp_path, model, request):
    """Pinned, non-blocking copies and the queued forward give the CPU's features (float32 compute, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    encoder = f"hf:{request.getfixturevalue(model)}"
    text = {"text": "captions"} if model == "tiny_bert" else {}
    cpu = open_store(_extract(tmp_path / "cpu", encoder, "float32", **text))
    gpu = open_store(_extract(tmp_path / "gpu", encoder, "float32", device="cuda", **text))
    for name in ("patches", "cls") if model == "tiny_dinov2" else ("tokens", "pooled", "length"):
        a, b = cpu.read(name).astype(np.float64), gpu.read(name).astype(np.float64)
        assert np.allclose(a, b, rtol=2e-3, atol=2e-3), (name, np.abs(a - b).max())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_auto_compute_is_bf16_and_close(tmp_path, tiny_dinov2):
    encoder = f"hf:{tiny_dinov2}"
    auto = open_store(_extract(tmp_path / "auto", encoder, "auto", device="cuda"))
    assert auto.layout.encoder["compute_dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    f32 = open_store(_extract(tmp_path / "f32", encoder, "float32"))
    assert _token_cosines(f32.read("patches"), auto.read("patches")).min() >= BF16_MIN_COSINE


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and _has_triton()), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_autotuned_triton_matches_reference_at_vit_shapes(dtype, tol, monkeypatch):
    """The autotuned kernel (whatever tile it picked) at T=257, K=512, D=384 against the float64 reference."""
    from pipe_align.align.kernel import anchor_profiles, anchor_profiles_reference

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randn(64, 257, 384, device="cuda", generator=gen).to(dtype)
    mask = torch.rand(64, 257, device="cuda", generator=gen) > 0.1
    anchors = torch.randn(512, 384, device="cuda", generator=gen, requires_grad=True)
    p = anchor_profiles(tokens, mask, anchors, 0.03, backend="triton")
    (ga,) = torch.autograd.grad(p.sum(), anchors)
    a64 = anchors.detach().double().requires_grad_()
    p_ref = anchor_profiles_reference(tokens.double(), mask, a64, 0.03)
    (ga_ref,) = torch.autograd.grad(p_ref.sum(), a64)
    assert (p.double() - p_ref).abs().max() <= tol
    assert (ga.double() - ga_ref).abs().max() <= tol * ga_ref.abs().max()
