"""Text encoders (BERT, MPNet, RoBERTa, ...), sentence-transformers checkpoints included.

A caption's tokens are every attention-mask position, the tokenizer's special tokens ([CLS]/[SEP], <s></s>) included,
as the PAL authors pool them (`special_tokens="keep"`; `max_length` counts every token, so the forward sees at most
max_length). The recorded variant `special_tokens="drop"` keeps the word tokens only, shifted to positions 0..n-1,
and `max_length` then counts word tokens (the forward sees up to max_length + the specials). `pooled` is the model's own
sentence embedding: sentence-transformers mean pooling (over every non-pad token, specials included, no
normalisation) where the folder says so, else the CLS state. Pooling always reads last_hidden_state, whatever
`layer` the word tokens come from, because that is what the sentence embedding is defined on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import PipeError
from .base import (
    SPECIAL_TOKENS,
    EncoderInfo,
    Options,
    Source,
    TextEncoder,
    check_choice,
    dtype_name,
    hub_kwargs,
    load_model,
    load_pretrained,
    parse_layer,
)
from .registry import register, register_types

MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "roberta-large": "sentence-transformers/all-roberta-large-v1",
}
POOLINGS = ("mean", "cls", "max")


class TransformerTextEncoder(TextEncoder):
    """Tokenize, run, keep the attention-mask positions (specials dropped in the "drop" variant), left-align them
    into a fixed [B, L, D] block."""

    def __init__(
        self,
        info: EncoderInfo,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        layer_index: int | None,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.info = info
        self.model = model
        self.tokenizer = tokenizer
        self.layer_index = layer_index
        self.device = torch.device(device)
        self.dtype = dtype
        self.keep_specials = check_choice(info.special_tokens or "keep", SPECIAL_TOKENS, "--special-tokens") == "keep"
        specials = 0 if self.keep_specials else tokenizer.num_special_tokens_to_add(pair=False)
        limit = _position_limit(model.config, tokenizer)
        if int(info.max_length or 0) > limit:
            raise PipeError(
                f"--max-length {info.max_length} is more than encoder {info.alias!r} accepts ({limit} tokens)"
            )
        self.seq_cap = min(int(info.max_length or 0) + specials, limit)  # dropped specials at the limit take 2 of it

    def fitted_to(self, texts: list[str]) -> TransformerTextEncoder:
        """This encoder with `max_length` set to the longest of `texts` as tokenized (its special tokens counted
        under "keep"), at most the model's limit: `max_length="longest"`, the authors' `padding="longest"` without
        truncation (shiwonkim/PAL_working src/datasets/coco_dataset.py:61-67). Shares the loaded model."""
        limit = _position_limit(self.model.config, self.tokenizer)
        specials = 0 if self.keep_specials else self.tokenizer.num_special_tokens_to_add(pair=False)
        longest = 1
        for i in range(0, len(texts), 4096):
            ids = self.tokenizer(list(texts[i : i + 4096]), add_special_tokens=True)["input_ids"]
            longest = max([longest, *(len(x) - specials for x in ids)])
        fitted = copy.copy(self)
        fitted.info = dataclasses.replace(self.info, max_length=max(1, min(longest, limit - specials)))
        fitted.seq_cap = min(int(fitted.info.max_length) + specials, limit)
        return fitted

    def encode(
        self, texts: list[str], out_dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [B,L,D], length [B] int64, pooled [B,D]) on the model's device, features in `out_dtype` (the
        gather and pooling run in float32 whatever the compute dtype)."""
        return self.encode_batch(self.tokenize(texts), out_dtype)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The tokenizer's tensors for `encode_batch` (pinned on CUDA); a thread can run it ahead of the forward."""
        if not texts:
            return {}
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.seq_cap,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        if self.device.type == "cuda" and torch.cuda.is_available():
            return {key: value.pin_memory() for key, value in batch.items()}
        return dict(batch)

    def encode_batch(
        self, batch: dict[str, torch.Tensor], out_dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, ...]:
        """`encode` of an already tokenized batch."""
        length_cap, dim = int(self.info.max_length or 0), self.info.dim
        if not batch:
            empty = torch.zeros(0, length_cap, dim, device=self.device, dtype=out_dtype)
            return empty, torch.zeros(0, dtype=torch.long, device=self.device), empty[:, 0]
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        special = batch.pop("special_tokens_mask").bool()
        inputs = batch
        attention = inputs["attention_mask"].bool()
        hidden = self.layer_index is not None
        with torch.no_grad():
            out = self.model(**inputs, output_hidden_states=hidden)
        last = out.last_hidden_state.float()
        states = out.hidden_states[self.layer_index].float() if hidden else last

        valid = attention if self.keep_specials else attention & ~special
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid positions first, in order
        gathered = states.gather(1, order.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        # a text whose tokenizer kept no word (only the specials) has nothing to say: length 0, refused by the runner
        length = valid.sum(dim=1).clamp(max=length_cap) * (attention & ~special).any(dim=1)
        take = min(length_cap, gathered.shape[1])
        tokens = torch.zeros(len(length), length_cap, dim, device=self.device)
        keep = torch.arange(take, device=self.device).unsqueeze(0) < length.unsqueeze(1)
        tokens[:, :take] = gathered[:, :take] * keep.unsqueeze(-1)
        pooled = _pool(last, attention, self.info.pooling or "cls")
        return tokens.to(out_dtype), length.long(), pooled.to(out_dtype)


def _pool(last: torch.Tensor, attention: torch.Tensor, pooling: str) -> torch.Tensor:
    """The sentence-transformers Pooling module's arithmetic (mean / max over non-pad tokens), or CLS."""
    if pooling == "mean":
        mask = attention.unsqueeze(-1).to(last.dtype)
        return (last * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if pooling == "max":
        return last.masked_fill(~attention.unsqueeze(-1), -1e9).max(dim=1).values
    return last[:, 0]


def _position_limit(config: Any, tokenizer: Any) -> int:
    """Longest input the model accepts (RoBERTa reserves 2 positions for its padding offset)."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0) or 512
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        limit -= 2
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < limit:
        limit = model_max
    return limit


def detect_pooling(source: Source) -> str:
    """ "mean"/"max"/"cls" from a sentence-transformers layout (modules.json -> Pooling config, or
    1_Pooling/config.json); "cls" for a plain transformers model."""
    modules = _read_json(source, "modules.json")
    paths = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")] if modules else []
    config = None
    for path in paths or ["1_Pooling"]:
        config = _read_json(source, f"{path}/config.json" if path else "config.json")
        if config:
            break
    if not isinstance(config, dict):
        return "cls"
    mode = config.get("pooling_mode")
    if isinstance(mode, str) and mode in POOLINGS:
        return mode
    for name in POOLINGS:
        if config.get(f"pooling_mode_{name}_tokens") or config.get(f"pooling_mode_{name}_token"):
            return name
    return "cls"


def _read_json(source: Source, filename: str) -> Any:
    """A JSON file from the folder or the hub repo; None where it does not exist or cannot be fetched."""
    folder = Path(source.model_id)
    if folder.is_dir():
        path = folder / filename
    else:
        try:
            from transformers.utils import cached_file

            found = cached_file(
                source.model_id,
                filename,
                **hub_kwargs(source),
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:  # any hub trouble means "no sentence-transformers layout"
            return None
        if not found:
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_text_encoder(source: Source, options: Options, pooling: str | None = None) -> TransformerTextEncoder:
    """Load tokenizer and model through the Auto classes; pooling detected from the files unless given."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, source, "tokenizer")
    model = load_model(AutoModel, source, options)
    config = model.config
    num_layers = int(config.num_hidden_layers)
    layer_index = parse_layer(options.layer, num_layers)
    info = EncoderInfo(
        alias=source.alias,
        model_id=source.model_id,
        revision=source.identity,
        weights=source.weights,
        modality="text",
        dim=int(config.hidden_size),
        layer="last" if layer_index is None else str(layer_index),
        image_size=None,
        patch_size=None,
        num_register_tokens=0,
        pooling=pooling or detect_pooling(source),
        max_length=int(options.max_length),
        compute_dtype=dtype_name(options.dtype),
        special_tokens=check_choice(options.special_tokens, SPECIAL_TOKENS, "--special-tokens"),
    )
    return TransformerTextEncoder(
        info, model, tokenizer, layer_index=layer_index, device=options.device, dtype=options.dtype
    )


@register(MODELS)
def build_sentence_transformer(source: Source, options: Options) -> TransformerTextEncoder:
    """The registered sentence-transformers checkpoints all mean-pool."""
    return build_text_encoder(source, options, pooling="mean")


@register_types(text_fallback=True)
def build_any_text(source: Source, options: Options) -> TransformerTextEncoder:
    """Every non-vision model reached through hf:."""
    return build_text_encoder(source, options)
