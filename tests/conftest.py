"""Shared fixtures: tiny random transformers models written with save_pretrained, once per test session."""

import os

import pytest

from tests.s3_server import s3, s3_endpoint  # noqa: F401  (fixtures: a local S3 on 127.0.0.1)
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
            cfg = ExtractConfig(
                encoder=enc,
                dataset="world",
                split=split,
                features=str(feats),
                text=text,
                options=(("size", size),),
                batch_size=8,
                shard_rows=8,
            )
            run_extract(cfg, progress=False)
    return feats


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the cores are shared (OpenMP workers spin
    against other processes: a 200x200 Sinkhorn went from 0.05 s to 2 s with 2 threads on a busy box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interrupt_at(monkeypatch):
    """`interrupt_at(epoch)`: training is interrupted (KeyboardInterrupt, as Ctrl-C) when it reaches `epoch`, after the
    checkpoints of the earlier epochs; `interrupt_at(None)` trains normally again."""
    from pipe_align.align.loop import Trainer

    original = Trainer.train_epoch

    def set_epoch(epoch):
        def dying(self, *a, **k):
            if self.epoch == epoch:
                raise KeyboardInterrupt
            return original(self, *a, **k)

        monkeypatch.setattr(Trainer, "train_epoch", original if epoch is None else dying)

    return set_epoch


@pytest.fixture(autouse=True)
def state_left_as_found():
    """Order independence: no test may leave behind state that another test would see. After every test the method
    registry, the working directory, torch's thread count and the environment are what they were before it
    (monkeypatch and the fixtures above restore theirs first). In the environment, a variable changed or removed
    counts, and one added if it is pipe's own (PIPE_*): libraries add their own on first use (torch's compiler its
    cache dir). `pytest --reverse` runs the suite the other way round."""
    import torch

    from pipe_align.align.methods import method_names

    def state() -> dict:
        return {"methods": method_names(), "cwd": os.getcwd(), "threads": torch.get_num_threads()}

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    before = state()
    yield
    changed = {k: (before[k], v) for k, v in state().items() if before[k] != v}
    changed |= {k: (v, os.environ.get(k)) for k, v in env.items() if os.environ.get(k) != v}
    changed |= {k: (None, v) for k, v in os.environ.items() if k.startswith("PIPE_") and k not in env}
    assert not changed, f"the test left changed global state behind: {changed}"
