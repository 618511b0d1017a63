"""Shared fixtures: tiny random transformers models written with save_pretrained, once per test session."""

import pytest

from tests.tiny_models import make_tiny_bert, make_tiny_dinov2


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    return str(make_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert"))
