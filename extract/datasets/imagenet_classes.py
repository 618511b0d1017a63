"""CLIP's ImageNet class names and its 80 prompt templates (facts, kept in imagenet_classes.json beside this file),
keyed by synset id (wnid) in the sorted order that torchvision's ImageNet and ImageFolder give the 1000 classes."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

DATA_FILE = Path(__file__).with_name("imagenet_classes.json")
WNID = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def _data() -> dict:
    with open(DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def imagenet_classes() -> dict[str, str]:
    """wnid -> CLIP's class name, for the 1000 ILSVRC2012 classes, in label order (sorted wnids)."""
    return dict(_data()["classes"])


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet templates ("{}" = class name)."""
    return list(_data()["templates"])


def is_wnid(name: str) -> bool:
    return WNID.fullmatch(name) is not None
