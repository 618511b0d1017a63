"""The PAL authors' data path (shiwonkim/PAL_working), written down independently of the code under test and compared
with what the stores hold: the image layer (the last block's output before DINOv2's final norm), timm's crop_pct 1.0
transform, every attention-mask position of a caption, and the recorded choices refusing to mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipe_align.extract.datasets import get_dataset
from pipe_align.extract.encoders import load_encoder
from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, run_extract
from pipe_align.extract.store import open_store
from tests.replicas import replica

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # timm's IMAGENET_DEFAULT_MEAN / STD (DINOv2's config)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def authors_transform(image: Image.Image, size: int) -> torch.Tensor:
    """timm.data.create_transform(input_size=(3, S, S), crop_pct=1.0, interpolation="bicubic") as the authors build it
    (src/models/backbones/vision_models.py:31-38), spelled out: RGB; torchvision Resize(S): the short side to S, the
    long side int(S * long / short), bicubic; CenterCrop(S): offsets int(round((side - S) / 2)); ToTensor; Normalize."""
    image = image.convert("RGB")
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.Resampling.BICUBIC)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (x - MEAN) / STD


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def hidden(folder: str, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states[-1], last_hidden_state) of the model run by hand."""
    from transformers import AutoModel

    with torch.no_grad():
        out = AutoModel.from_pretrained(folder).eval()(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-1], out.last_hidden_state


def test_short_side_crop_is_timms_crop_pct_1(tiny_dinov2) -> None:
    """Odd margins (where torchvision rounds and transformers floors), portrait and landscape, up- and downscaling."""
    enc = load_encoder(f"hf:{tiny_dinov2}", crop="short-side")
    assert enc.info.crop == "short-side" and enc.info.image_size == 56
    images = [picture(93, 48, 0), picture(48, 93, 1), picture(120, 75, 2), picture(57, 56, 3), picture(300, 211, 4)]
    expected = torch.stack([authors_transform(im, 56) for im in images])
    torch.testing.assert_close(enc.preprocess(images), expected, atol=1e-6, rtol=0)
    processor = load_encoder(f"hf:{tiny_dinov2}")  # the model's own: short side 64 (= 56 * 256 / 224) first
    assert processor.info.crop == "processor"
    assert not torch.allclose(processor.preprocess(images[:1]), expected[:1])
    with pytest.raises(PipeError, match="--crop must be one of processor, short-side"):
        load_encoder(f"hf:{tiny_dinov2}", crop="centre")


def test_caption_tokens_are_every_attention_mask_position(tiny_bert) -> None:
    """The authors tokenize with padding="longest" and no truncation (src/datasets/coco_dataset.py:61-67) and pool
    every position where attention_mask is 1 (feature_store.py:249, pal.py:161-163)."""
    from transformers import AutoModel, AutoTokenizer

    texts = ["a red cat on the grass", "two dogs", "the small blue square near the yellow star on the left"]
    enc = load_encoder(f"hf:{tiny_bert}", max_length=16)
    assert enc.info.special_tokens == "keep"
    tokens, length, _ = enc.encode(texts)
    batch = AutoTokenizer.from_pretrained(tiny_bert)(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(tiny_bert).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert length.tolist() == mask.sum(1).tolist()
    for row in range(len(texts)):
        n = int(mask[row].sum())
        torch.testing.assert_close(tokens[row, :n], states[row][mask[row]])
        assert tokens[row, n:].abs().sum() == 0
    dropped = load_encoder(f"hf:{tiny_bert}", max_length=16, special_tokens="drop")
    words, word_length, _ = dropped.encode(texts)
    assert dropped.info.special_tokens == "drop" and (word_length == length - 2).all()  # [CLS] and [SEP]
    torch.testing.assert_close(words[0, : int(word_length[0])], states[0, 1 : int(length[0]) - 1])


# ------------------------------------------------------------------------------------------- the recipe, end to end


EVAL_SETS = "stl10,cifar100,flickr30k,coco-karpathy,voc,pascal-context,ade20k"


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, tiny_dinov2, tiny_bert) -> tuple[Path, Path]:
    """`pipe reproduce pal-paper` on a COCO 2014 folder of non-square images (the replica's 64-96 x 48-60 px JPEGs),
    every eval set skipped, PAL only, tiny encoders, one epoch: the issue's "done when" command."""
    from pipe_align.pipelines.cli import main

    data = tmp_path_factory.mktemp("paper-data")
    replica("coco", data / "coco")
    out = tmp_path_factory.mktemp("paper-out")
    args = ["reproduce", "pal-paper", "--data", str(data), "--skip", EVAL_SETS, "--only", "pal", "--out", str(out),
            "--set", f"encoders.image=hf:{tiny_dinov2}", "--set", f"encoders.text=hf:{tiny_bert}",
            "--set", "train.epochs=1", "--no-progress", "--no-figures"]  # fmt: skip
    assert main(args) == 0
    return data, out


def store_of(out: Path, split: str, modality: str):
    folder = out / "features" / "coco2014" / split
    stores = [open_store(p) for p in sorted(folder.glob("*.zarr"))]
    return next(s for s in stores if s.layout.modality == modality)


def test_paper_image_store_is_the_last_block_on_the_authors_crop(paper_run, tiny_dinov2) -> None:
    data, out = paper_run
    store = store_of(out, "train", "image")
    assert store.layout.encoder["layer"] == "-1" and store.layout.encoder["crop"] == "short-side"
    assert store.layout.resize == "crop"
    ds = get_dataset("coco", data / "coco", "train", year=2014)
    assert [r.id for r in ds.images()] == list(store["ids"][:])
    images = [ds.load_image(i) for i in range(len(ds))]
    assert len({im.size for im in images}) > 3 and all(im.size[0] != im.size[1] for im in images)
    pixels = torch.stack([authors_transform(im, 56) for im in images])
    pre_norm, after_norm = hidden(tiny_dinov2, pixels)
    patches, cls = store.rows("patches").float(), store.rows("cls").float()
    torch.testing.assert_close(patches, pre_norm[:, 1:], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cls, pre_norm[:, 0], rtol=2e-3, atol=2e-3)
    assert not torch.allclose(patches, after_norm[:, 1:], atol=1e-2)  # the final LayerNorm is not applied


def test_paper_caption_store_keeps_the_special_tokens(paper_run, tiny_bert) -> None:
    from transformers import AutoModel, AutoTokenizer

    _, out = paper_run
    store = store_of(out, "train", "text")
    assert store.layout.encoder["special_tokens"] == "keep" and store.layout.encoder["layer"] == "-1"
    texts = [str(t) for t in store["text"][:]]
    batch = AutoTokenizer.from_pretrained(tiny_bert)(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(tiny_bert).eval()(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].bool()
    length = torch.from_numpy(store["length"][:].astype(np.int64))
    assert length.tolist() == mask.sum(1).tolist()
    tokens = store.rows("tokens").float()
    for row in range(len(texts)):
        n = int(length[row])
        torch.testing.assert_close(tokens[row, :n], states[row][mask[row]], rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------------------------ recorded choices


def test_other_crop_or_specials_are_another_store(tmp_path, tiny_dinov2, tiny_bert) -> None:
    root = replica("coco", tmp_path / "coco")
    feats = tmp_path / "features"
    base = dict(dataset="coco", split="val", features=str(feats), root=str(root), limit=3)
    run_extract(ExtractConfig(encoder=f"hf:{tiny_dinov2}", crop="short-side", **base), progress=False)
    run_extract(ExtractConfig(encoder=f"hf:{tiny_bert}", **base), progress=False)
    with pytest.raises(PipeError, match="differs in encoder crop short-side vs processor"):
        run_extract(ExtractConfig(encoder=f"hf:{tiny_dinov2}", **base), progress=False)
    with pytest.raises(PipeError, match="differs in encoder special_tokens keep vs drop"):
        run_extract(ExtractConfig(encoder=f"hf:{tiny_bert}", special_tokens="drop", **base), progress=False)
    with pytest.raises(PipeError, match="--special-tokens must be one of keep, drop"):
        run_extract(ExtractConfig(encoder=f"hf:{tiny_bert}", special_tokens="all", **base), progress=False)


def test_eval_refuses_a_store_with_other_choices(tmp_path, tiny_bert) -> None:
    """A run trained on caption tokens with the specials is not evaluated on prompts without them, and a store
    written before the choice was recorded (no `special_tokens` attribute) dropped them."""
    from pipe_align.evaluate.context import check_encoder

    root = replica("coco", tmp_path / "coco")
    feats = tmp_path / "features"
    cfg = ExtractConfig(encoder=f"hf:{tiny_bert}", dataset="coco", split="val", features=str(feats), root=str(root),
                        limit=2)  # fmt: skip
    store = open_store(run_extract(cfg, progress=False).path)
    trained = dict(store.layout.encoder)
    meta = {"text_encoder": f"hf:{tiny_bert}", "encoders": {"text": trained}}
    check_encoder(store, meta, "text", "RUN")  # the same choices: accepted
    meta["encoders"]["text"] = trained | {"special_tokens": "drop"}
    with pytest.raises(PipeError, match="special_tokens='keep' but run RUN was trained on special_tokens='drop'"):
        check_encoder(store, meta, "text", "RUN")
    zarr_json = store.path / "zarr.json"
    doc = json.loads(zarr_json.read_text())
    del doc["attributes"]["encoder"]["special_tokens"]  # as written before the choice existed
    zarr_json.write_text(json.dumps(doc))
    old = open_store(store.path)
    meta["encoders"]["text"] = trained
    with pytest.raises(PipeError, match="special_tokens='drop' but run RUN was trained on special_tokens='keep'"):
        check_encoder(old, meta, "text", "RUN")
