"""Shared fixtures: tiny random transformers models written with save_pretrained, once per test session."""

import pytest

from tests.tiny_models import make_tiny_bert, make_tiny_dinov2


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    return str(make_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert"))


@pytest.fixture(scope="session")
def world_features(tmp_path_factory, tiny_dinov2, tiny_bert):
    """World train (24 images, captions) and val (8 images, captions + class prompts) stores from the tiny models."""
    from pipe_align.extract.runner import ExtractConfig, run_extract

    feats = tmp_path_factory.mktemp("features")
    for split, size in (("train", 24), ("val", 8)):
        encoders = ((f"hf:{tiny_dinov2}", "auto"), (f"hf:{tiny_bert}", "captions"), (f"hf:{tiny_bert}", "prompts"))
        for enc, text in encoders:
            if split == "train" and text == "prompts":
                continue
            cfg = ExtractConfig(encoder=enc, dataset="world", split=split, features=str(feats), text=text,
                                options=(("size", size),), batch_size=8, shard_rows=8)  # fmt: skip
            run_extract(cfg, progress=False)
    return feats
