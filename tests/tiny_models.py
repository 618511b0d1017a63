"""Tiny random transformers models written with save_pretrained, so tests load them through `hf:<path>` exactly
like a real checkpoint, offline and in milliseconds. Seeded: the same call writes the same weights."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

WORDS = """
a an the this that these those some many few one two three four five six seven eight nine ten
of on in at to from with without and or but by for near under over above below behind beside between inside
left right top bottom middle center front back next up down
photo picture image painting drawing sketch render view scene close shot
small large big tiny huge little tall short long wide narrow round square flat bright dark light pale deep
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
circle square triangle rectangle star ring disk ball cube box sphere cone cylinder line dot stripe shape
cat dog bird horse cow sheep car bus bike boat plane train person man woman child people table chair
tree flower grass sky sun cloud water river road house wall floor window door field mountain sea
is are was were has have there it its his her their sits stands lies runs flies next
old new young pretty plain striped spotted shiny soft hard empty full open closed
very quite together alone another other each every both all
""".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUFFIXES = ["##s", "##es", "##ed", "##ing", "##er", "##ly"]


def make_tiny_dinov2(
    path: str | Path,
    *,
    num_register_tokens: int = 0,
    image_size: int = 56,
    patch_size: int = 14,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
) -> Path:
    """A random Dinov2Model (or Dinov2WithRegistersModel) with a BitImageProcessor config (crop = image_size)."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    path = Path(path)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=2,
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    if num_register_tokens:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **common))
        with torch.no_grad():  # registers start at zero; make them distinct so dropping the wrong rows shows
            model.embeddings.register_tokens.normal_(0.0, 1.0)
    else:
        model = Dinov2Model(Dinov2Config(**common))
    model.eval().save_pretrained(path)
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": round(image_size * 256 / 224)},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
            "do_convert_rgb": True,
        },
    )
    return path


def make_tiny_clip(
    path: str | Path, *, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2, heads: int = 2
) -> Path:
    """A random full CLIPModel (model_type "clip", like openai/clip-vit-base-patch16) + a CLIP processor config."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    torch.manual_seed(0)
    vision = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )
    text = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=99,
        max_position_embeddings=16,
        projection_dim=16,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(path)
    _write_json(
        path / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": image_size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    )
    return path


def make_tiny_bert(
    path: str | Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    *,
    pooling: str | None = "mean",
    max_positions: int = 64,
) -> Path:
    """A random BertModel + WordPiece tokenizer. pooling="mean"/"cls" writes a sentence-transformers layout
    (modules.json + 1_Pooling/config.json); pooling=None writes a plain transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = (
        SPECIALS
        + sorted(set(WORDS))
        + SUFFIXES
        + list("abcdefghijklmnopqrstuvwxyz")
        + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    )
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    # transformers 5 renamed the argument (vocab_file -> vocab) and ignores the old name: the tokenizer then knows only
    # its 5 special tokens and every word becomes [UNK], so every caption and prompt looks alike.
    takes_vocab = "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters
    tokenizer = BertTokenizerFast(**{"vocab" if takes_vocab else "vocab_file": str(vocab_file)}, do_lower_case=True)
    if len(tokenizer) != len(set(vocab)):
        raise RuntimeError(f"tiny BERT tokenizer has {len(tokenizer)} tokens, not the {len(set(vocab))} in vocab.txt")
    tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=max_positions,
    )
    BertModel(config).eval().save_pretrained(path)
    if pooling is not None:
        _write_json_list(
            path / "modules.json",
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
        )
        (path / "1_Pooling").mkdir(exist_ok=True)
        _write_json(
            path / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
        )
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_json_list(path: Path, data: list) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
