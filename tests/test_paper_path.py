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
    args = [
        "reproduce",
        "pal-paper",
        "--data",
        str(data),
        "--skip",
        EVAL_SETS,
        "--only",
        "pal",
        "--out",
        str(out),
        "--set",
        f"encoders.image=hf:{tiny_dinov2}",
        "--set",
        f"encoders.text=hf:{tiny_bert}",
        "--set",
        "train.epochs=1",
        "--no-progress",
        "--no-figures",
    ]
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
    assert length.tolist() == mask.sum(1).tolist()  # nothing truncated
    assert store.layout.tokens == mask.shape[1]  # max_length "longest": the authors' padding="longest" width
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
    cfg = ExtractConfig(
        encoder=f"hf:{tiny_bert}", dataset="coco", split="val", features=str(feats), root=str(root), limit=2
    )
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


# ------------------------------------------------------------------------------- captions, held-out pairs, schedule


def first_captions(annotation_file: Path) -> dict[int, str]:
    """The authors' pick (alignment_trainer.py:680-690, n_dup_samples 1): per image, the first of its captions in the
    annotation file's order (`df.groupby("image_path").cumcount() < 1`)."""
    out: dict[int, str] = {}
    for ann in json.loads(annotation_file.read_text())["annotations"]:
        out.setdefault(ann["image_id"], ann["caption"].strip())
    return out


def test_paper_run_trains_on_all_of_train_and_stops_on_val2014(paper_run) -> None:
    from tests.replicas.coco import TRAIN, VAL

    data, out = paper_run
    meta = json.loads((out / "runs" / "pal" / "run.json").read_text())
    assert meta["pairs"]["train"] == TRAIN  # every train2014 image trains, none held out
    held = meta["heldout_stores"]
    assert (held["dataset"], held["split"], held["pairs"]) == ("coco2014", "val", VAL)
    assert meta["run"]["captions"] == "first" and meta["run"]["val_fraction"] == 0.0
    assert meta["run"]["val_shards"] == str(out / "features" / "coco2014" / "val")
    assert "val_loss" in meta["history"][0]  # early stopping watched val2014


@pytest.mark.parametrize("split", ["train", "val"])
def test_first_caption_rule_is_the_files_first_caption(paper_run, split) -> None:
    from pipe_align.align.data import PairSource, PairStores, pair_split

    data, out = paper_run
    stores = PairStores(store_of(out, split, "image"), store_of(out, split, "text"))
    cut = pair_split(stores, 0.0, 0)
    ids = [str(i) for i in stores.image["ids"][:]]
    first = first_captions(data / "coco" / "annotations" / f"captions_{split}2014.json")
    want = [first[int(i.rsplit("_", 1)[1])] for i in ids]
    texts = stores.text["text"][:]
    rule = PairSource(stores, cut.train, cut.captions, tokens=False, caption_rule="first")
    for epoch in range(3):
        assert [str(texts[c]).strip() for c in rule.choose_captions(cut.train, epoch, 0)] == want
    drawn = PairSource(stores, cut.train, cut.captions, tokens=False)  # the other rule: a caption drawn per epoch
    picks = {epoch: [str(texts[c]).strip() for c in drawn.choose_captions(cut.train, epoch, 0)] for epoch in range(3)}
    assert picks[0] != picks[1] and picks[0] != want


def test_periodic_cosine_period_follows_all_of_train(paper_run) -> None:
    """The authors' CosineAnnealingLR: T_max = scheduler_epoch_cycles (50) x max(1, train pairs // batch)
    (alignment_trainer.py:1297-1302): with every train2014 image training, 50 x (24 // 5) = 200 steps."""
    from pipe_align.align.base import TrainingData
    from pipe_align.align.data import PairSource, PairStores, heldout_stores, pair_split
    from pipe_align.align.loop import RunConfig, Trainer
    from pipe_align.align.pal import PAL, PALConfig
    from tests.replicas.coco import TRAIN

    _, out = paper_run
    stores = PairStores(store_of(out, "train", "image"), store_of(out, "train", "text"))
    val_folder = out / "features" / "coco2014" / "val"
    run = RunConfig(batch_size=5, epochs=1, val_fraction=0.0, val_shards=str(val_folder), captions="first")
    cut = pair_split(stores, run.val_fraction, run.seed)
    held = heldout_stores(val_folder, stores)
    held_cut = pair_split(held, 0.0, run.seed)
    data = TrainingData(
        PairSource(stores, cut.train, cut.captions, tokens=True, caption_rule="first"),
        PairSource(held, held_cut.train, held_cut.captions, tokens=True, caption_rule="first"),
    )
    trainer = Trainer(PAL, PALConfig(anchors=8, lr_finder=0), run.resolved(PAL), data)
    assert trainer.period == 50 * (TRAIN // 5) == 200


def test_heldout_store_set_must_match_and_not_double_count(paper_run, tmp_path, tiny_dinov2) -> None:
    from pipe_align.align.data import PairStores, heldout_stores
    from pipe_align.align.loop import RunConfig

    data, out = paper_run
    stores = PairStores(store_of(out, "train", "image"), store_of(out, "train", "text"))
    with pytest.raises(PipeError, match="holds the training stores themselves"):
        heldout_stores(out / "features" / "coco2014" / "train", stores)
    with pytest.raises(PipeError, match="give --val-fraction 0"):
        RunConfig(val_shards=str(out), val_fraction=0.05)
    with pytest.raises(PipeError, match="--captions must be one of draw, first"):
        RunConfig(captions="second")
    other = tmp_path / "features"  # val2014 stores cropped as the model's processor says: not comparable
    base = dict(dataset="coco", split="val", features=str(other), root=str(data / "coco"), layer="-1")
    run_extract(ExtractConfig(encoder=f"hf:{tiny_dinov2}", **base), progress=False)
    text = store_of(out, "val", "text")
    run_extract(ExtractConfig(encoder=text.layout.encoder["alias"], **base), progress=False)
    with pytest.raises(PipeError, match="has encoder crop='processor' but the training store .* has crop='short-side'"):
        heldout_stores(other / "coco2014" / "val", stores)
    padded = tmp_path / "padded"  # the same choices at another padding length: comparable
    base |= {"features": str(padded), "crop": "short-side"}
    run_extract(ExtractConfig(encoder=f"hf:{tiny_dinov2}", **base), progress=False)
    run_extract(ExtractConfig(encoder=text.layout.encoder["alias"], max_length=40, **base), progress=False)
    held = heldout_stores(padded / "coco2014" / "val", stores)
    assert held.text.layout.tokens == 40 != stores.text.layout.tokens


def test_recipe_runs_every_trained_method_as_the_authors(tmp_path) -> None:
    """configs/default.yaml:67 and :83: n_epochs 1000, early_stopping_patience 200 for every method (the linear and
    MLP configs do not override them); the data path as in the authors' token_k512.yaml and vision_models.py."""
    from pipe_align.pipelines.recipe import load_recipe

    r = load_recipe("pal-paper", data=tmp_path)
    assert (r.encoders.layer, r.encoders.crop, r.encoders.special_tokens) == ("-1", "short-side", "keep")
    assert (r.train.split, r.train.val_split, r.train.run.captions, r.train.run.val_fraction) == (
        "train",
        "val",
        "first",
        0.0,
    )
    for m in r.methods:
        if m.method in ("pal", "linear", "mlp"):
            assert (m.run.epochs, m.run.patience) == (1000, 200), m.name


def test_lr_finder_draws_full_batches_from_one_random_5000_subset() -> None:
    """base_trainer.py:182-199: subset = randperm(N)[:min(N, 5000)] once; per iteration randperm(subset)[:min(batch,
    subset)]."""
    from pipe_align.align.contrastive import LinearConfig, MLPConfig
    from pipe_align.align.loop import finder_draws
    from pipe_align.align.pal import PALConfig

    class Rows:
        def __len__(self) -> int:
            return 12_000

        def batch_of(self, positions, epoch, seed, part=None):
            return np.asarray(positions)

    draws = finder_draws(Rows(), 4096, seed=3)
    seen = [next(draws) for _ in range(60)]
    assert all(len(d) == 4096 == len(set(d.tolist())) for d in seen)
    union = set(np.concatenate(seen).tolist())
    assert len(union) == 5000 and max(union) < 12_000  # 60 draws of 4096 cover the subset, nothing outside it
    assert not all((seen[0] == d).all() for d in seen[1:])
    small = next(finder_draws(Rows(), 20_000, seed=3))
    assert len(small) == 5000  # min(batch, subset)
    for cfg in (PALConfig(), LinearConfig(), MLPConfig()):
        assert cfg.lr_finder_draw == "subset"


def test_batch_of_serves_the_pairs_asked_for(paper_run) -> None:
    from pipe_align.align.data import PairSource, PairStores, pair_split

    _, out = paper_run
    stores = PairStores(store_of(out, "train", "image"), store_of(out, "train", "text"))
    cut = pair_split(stores, 0.0, 0)
    cls, pooled = stores.image.rows("cls").float(), stores.text.rows("pooled").float()
    for budget in (None, 0):  # in memory, and streamed from the stores
        src = PairSource(stores, cut.train, cut.captions, tokens=True, caption_rule="first", memory_budget=budget)
        assert src.in_memory is (budget is None)
        pos = np.array([7, 2, 19, 2])
        batch = src.batch_of(pos, 5, 0)
        rows = cut.train[pos]
        torch.testing.assert_close(batch.image.cls.float(), cls[rows])
        torch.testing.assert_close(batch.text.pooled.float(), pooled[[cut.captions[r][0] for r in rows]])


def test_dry_run_prints_the_plan_and_does_nothing(tmp_path, tiny_dinov2, tiny_bert, capsys) -> None:
    from pipe_align.pipelines.cli import main
    from tests.replicas.coco import TRAIN, VAL, captions_of

    data = tmp_path / "data"
    replica("coco", data / "coco")
    out = tmp_path / "out"
    args = [
        "reproduce",
        "pal-paper",
        "--data",
        str(data),
        "--skip",
        EVAL_SETS,
        "--out",
        str(out),
        "--set",
        f"encoders.image=hf:{tiny_dinov2}",
        "--set",
        f"encoders.text=hf:{tiny_bert}",
        "--dry-run",
        "--tflops",
        "50",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing written
    assert "layer -1, crop short-side" in printed and "special tokens keep" in printed
    n_caps = sum(len(captions_of("train", i)) for i in range(TRAIN))
    grid = (56 // 14) ** 2
    image_bytes = TRAIN * (grid + 1) * 32 * 2  # float16 patches + CLS
    assert f"coco2014/train/{Path(tiny_dinov2).name}" not in printed  # store names are the encoder alias's
    assert f"image, {TRAIN} rows x {grid} tokens x 32, {image_bytes / 1000:.1f} KB raw" in printed
    from transformers import AutoTokenizer

    texts = [t.strip() for i in range(TRAIN) for t in captions_of("train", i)]
    longest = AutoTokenizer.from_pretrained(tiny_bert)(texts, padding="longest", return_tensors="pt")["input_ids"]
    assert f"captions, {n_caps} rows x {longest.shape[1]} tokens x 32" in printed  # max_length "longest"
    assert f"image, {VAL} rows x {grid} tokens x 32" in printed  # the val2014 stores of early stopping
    assert f"({TRAIN} images, {n_caps} captions, early stopping on coco/val)" in printed
    assert "epochs 1000, batch_size 4096, patience 200, captions first" in printed and "h at 50 TFLOP/s" in printed
    assert main(args[:-2]) == 0  # the plan without a rate
    assert "give --tflops" in capsys.readouterr().out and not out.exists()
    assert main([*args[:-3], "--tflops", "5"]) == 2  # --tflops without --dry-run is a mistake
    assert "--tflops only applies with --dry-run" in capsys.readouterr().err


def test_fixed_anchor_pal_is_the_authors_asif_row(paper_run) -> None:
    """alignment_trainer.py:1421-1485: anchor_idx = torch.randperm(n_train, generator=seed)[:K]; image anchor = mean of
    the pair's image tokens (N, T, D -> D), text anchor = mask-aware mean of its caption's tokens; L2-normalised."""
    from pipe_align.align.base import ImageRows, TrainingData
    from pipe_align.align.data import PairSource, PairStores, pair_split
    from pipe_align.align.loop import RunConfig, fit
    from pipe_align.align.pal_fixed import PALFixed, PALFixedConfig

    _, out = paper_run
    stores = PairStores(store_of(out, "train", "image"), store_of(out, "train", "text"))
    cut = pair_split(stores, 0.0, 0)
    src = PairSource(stores, cut.train, cut.captions, tokens=True, caption_rule="first")
    result = fit(PALFixed, PALFixedConfig(anchors=6), RunConfig(seed=5, val_fraction=0.0), TrainingData(src))
    rows = cut.train[torch.randperm(len(cut.train), generator=torch.Generator().manual_seed(5))[:6].numpy()]
    cls, patches = stores.image.rows("cls").float(), stores.image.rows("patches").float()
    tokens, length = stores.text.rows("tokens").float(), stores.text["length"][:]
    image = torch.cat([cls[rows, None], patches[rows]], dim=1).mean(1)
    text = torch.stack([tokens[c, : length[c]].mean(0) for c in (cut.captions[r][0] for r in rows)])
    state = result.aligner.state_dict()
    torch.testing.assert_close(state["image_anchors"], torch.nn.functional.normalize(image, dim=1))
    torch.testing.assert_close(state["text_anchors"], torch.nn.functional.normalize(text, dim=1))
    emb = result.aligner.image_global(ImageRows(cls=cls[:3], patches=patches[:3]))
    assert emb.shape == (3, 6) and torch.allclose(emb.norm(dim=1), torch.ones(3))
    with pytest.raises(PipeError, match="exceeds the 24 training pairs"):
        fit(PALFixed, PALFixedConfig(anchors=25), RunConfig(val_fraction=0.0), TrainingData(src))
