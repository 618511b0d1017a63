"""The zero-shot classifier from a class-prompt store, shared by classification and segmentation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pipe_align.extract.errors import PipeError

from .context import EvalContext
from .loading import embed_texts
from .metrics import zero_shot_classifier


def class_weights(ctx: EvalContext) -> tuple[Tensor, list[str]]:
    """Zero-shot classifier [C, E] (on the CPU) from the class-prompt store: text_global per prompt (PAL: anchor
    pooling of the prompt's word tokens), each normalised, mean per class, renormalised."""
    st = ctx.text
    classes = list(st.layout.classes)
    emb = embed_texts(ctx.aligner, st, ctx.cfg.device)
    item = torch.from_numpy(st.read("item").astype(np.int64))
    try:
        return zero_shot_classifier(emb, item, len(classes)), classes
    except ValueError as e:
        raise PipeError(f"{st.path}: {e}") from None
