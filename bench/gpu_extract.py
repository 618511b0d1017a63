"""Extraction rows of the GPU check: `pipe extract` (the same code as the command, `run_extract`) against a bare
forward loop of the same loaded model, for DINOv2-L/14 and RoBERTa-large built from transformers configs of the real
sizes with random weights (saved with save_pretrained, loaded through `hf:<folder>` like any checkpoint), on a COCO
layout written into a temp folder (640x480 JPEGs, five captions per image). The bare loop is the model's forward on
inputs already on the device, in the compute dtype extraction picked (`--compute-dtype auto`); its model-FLOP
utilisation is its FLOPs (2 per multiply-add of the dense layers and attention) against the device's bf16 peak.
"""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from gpu_table import Table, sync
from PIL import Image

from pipe_align.extract.job import cached_encoder
from pipe_align.extract.runner import ExtractConfig, run_extract

WORDS = (
    "a an the two three some man woman child people dog cat horse bird bus car train boat plane bike table chair "
    "plate pizza cake tree street road field beach water sky snow room kitchen window grass is are sits stands "
    "runs rides holds eats looks near on in at with under next to of red blue green white black small large "
    "old young open wooden city park"
).split()
REAL = {
    "image": dict(hidden=1024, layers=24, heads=16, ffn=4096),
    "text": dict(hidden=1024, layers=24, heads=16, ffn=4096),
}
TINY = {"image": dict(hidden=32, layers=2, heads=2, ffn=64), "text": dict(hidden=32, layers=2, heads=2, ffn=64)}


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "." for _ in range(n)]


def make_vision(folder: Path, tiny: bool, device: str) -> Path:
    """DINOv2-L/14 as facebook/dinov2-large is configured (518 px position table, 224 px crop in the processor)."""
    from transformers import Dinov2Config, Dinov2Model

    s = TINY["image"] if tiny else REAL["image"]
    cfg = Dinov2Config(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        mlp_ratio=s["ffn"] // s["hidden"],
        patch_size=14,
        image_size=56 if tiny else 518,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Dinov2Model(cfg)
    model.eval().save_pretrained(folder)
    crop = 56 if tiny else 224
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": round(crop * 256 / 224)},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": crop, "width": crop},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
                "do_convert_rgb": True,
            }
        )
    )
    return folder


def make_text(folder: Path, tiny: bool, device: str) -> Path:
    """RoBERTa-large (vocab 50265) laid out as sentence-transformers/all-roberta-large-v1 (mean pooling), with a
    byte-level BPE tokenizer trained on the caption words (the real merges cannot be downloaded here)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        captions(4000, seed=1),
        vocab_size=2000,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.save_model(str(folder))
    RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")).save_pretrained(folder)
    s = TINY["text"] if tiny else REAL["text"]
    cfg = RobertaConfig(
        vocab_size=50265,
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        max_position_embeddings=514,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = RobertaModel(cfg)
    model.eval().save_pretrained(folder)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": s["hidden"], "pooling_mode_mean_tokens": True})
    )
    return folder


def make_coco(root: Path, n_images: int, tiny: bool) -> Path:
    """annotations/captions_train2017.json + train2017/*.jpg: 32 distinct smooth-plus-texture photos at COCO's
    640x480 (about COCO's file size), repeated under new names; five captions per image."""
    rng = np.random.default_rng(0)
    w, h = (96, 72) if tiny else (640, 480)
    bases = []
    for _ in range(32):
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        bases.append(buf.getvalue())
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    caps = captions(5 * n_images)
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        (root / "train2017" / name).write_bytes(bases[i % len(bases)])
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns += [{"id": 5 * i + j, "image_id": i, "caption": caps[5 * i + j]} for j in range(5)]
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def layer_flops(seq: int, hidden: int, ffn: int) -> float:
    """One transformer block's forward FLOPs for one sequence: QKV + output projections, MLP, scores and A.V."""
    return 2.0 * seq * (4 * hidden * hidden + 2 * hidden * ffn) + 4.0 * seq * seq * hidden


def bare_image_loop(enc, batch: int, n: int, device: str) -> float:
    """Rows/s of the model's forward alone on random pixels already on the device, in the model's dtype."""
    size = int(enc.info.image_size)
    pixels = torch.randn(batch, 3, size, size, device=device).to(enc.dtype)
    with torch.no_grad():
        enc.model(pixel_values=pixels)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch)):
            enc.model(pixel_values=pixels)
        sync(device)
    return max(1, n // batch) * batch / (time.perf_counter() - t0)


def bare_text_loop(enc, texts: list[str], batch: int, device: str) -> tuple[float, float]:
    """(rows/s, mean padded sequence length) of the forward alone on batches tokenized beforehand, on the device."""
    batches = [
        enc.tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=enc.seq_cap, return_tensors="pt")
        for i in range(0, len(texts), batch)
    ]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    seq = float(np.mean([b["input_ids"].shape[1] for b in batches]))
    with torch.no_grad():
        enc.model(**batches[0])
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            enc.model(**b)
        sync(device)
    return len(texts) / (time.perf_counter() - t0), seq


def run(table: Table, device: str, tiny: bool, tmp: Path, peak: float | None) -> None:
    n_images = 48 if tiny else 8192
    img_batch, txt_batch, max_length = (8, 32, 32) if tiny else (256, 1024, 32)
    t0 = time.perf_counter()
    vision = make_vision(tmp / "dinov2-large", tiny, device)
    text = make_text(tmp / "roberta-large", tiny, device)
    coco = make_coco(tmp / "coco", n_images, tiny)
    table.notes.append(f"extract setup (models, {n_images} JPEGs): {time.perf_counter() - t0:.1f} s")
    for modality, folder, batch in (("image", vision, img_batch), ("text", text, txt_batch)):
        enc_name = f"hf:{folder}"
        base = dict(
            encoder=enc_name,
            dataset="coco",
            split="train",
            root=str(coco),
            batch_size=batch,
            device=device,
            compute_dtype="auto",
            max_length=max_length,
            text="captions",
        )
        run_extract(ExtractConfig(features=str(tmp / f"warm-{modality}"), limit=2 * img_batch, **base), progress=False)
        summary = run_extract(ExtractConfig(features=str(tmp / f"feat-{modality}"), **base), progress=False)
        rate = summary.written_rows / summary.seconds
        enc = cached_encoder(enc_name, "last", None, max_length, device, "auto")
        dtype = str(enc.dtype).removeprefix("torch.")
        cfg = enc.model.config
        if modality == "image":
            bare = bare_image_loop(enc, batch, summary.written_rows, device)
            grid = int(enc.info.image_size) // 14
            seq = grid * grid + 1
            flops = cfg.num_hidden_layers * layer_flops(seq, cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio))
            flops += 2.0 * grid * grid * 3 * 14 * 14 * cfg.hidden_size  # patch embedding
        else:
            caps = [
                c["caption"]
                for c in json.loads((coco / "annotations" / "captions_train2017.json").read_text())["annotations"]
            ]
            bare, seq = bare_text_loop(enc, caps, batch, device)
            flops = cfg.num_hidden_layers * layer_flops(round(seq), cfg.hidden_size, cfg.intermediate_size)
        table.set(
            f"extract-{modality}",
            f"{rate:.0f} vs bare {bare:.0f} rows/s = {rate / bare:.2f}x ({dtype}, "
            f"batch {batch}, {summary.written_rows} rows)",
            rate >= 0.85 * bare,
        )
        tflops = bare * flops / 1e12
        if peak is None:
            table.set(
                f"mfu-{modality}",
                f"{tflops:.1f} TFLOP/s ({flops / 1e9:.1f} GFLOP/row, seq {seq:.0f}); peak unknown for this device",
                None,
            )
        else:
            table.set(
                f"mfu-{modality}",
                f"{tflops:.1f} TFLOP/s = {tflops / peak:.0%} of {peak:.0f} "
                f"({flops / 1e9:.1f} GFLOP/row, seq {seq:.0f})",
                tflops >= 0.35 * peak,
            )
