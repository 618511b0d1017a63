"""The one training loop: one meaning of patience, a stop on anything non-finite, and a method defined in one file
(here: in a test). The same held-out rows and resume after SIGKILL, for every method: tests/test_contract.py."""

from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipe_align.align import base
from pipe_align.align.base import ImageRows, StepContext, TextRows, TrainedAligner, TrainedConfig, l2n
from pipe_align.align.losses import info_nce
from pipe_align.align.methods import get_method, load_aligner
from pipe_align.pipelines.cli import main
from tests.contract import method_flags, trained

ROOT = Path(__file__).resolve().parents[1]


def shards(feats, split="train"):
    return str(feats / "world" / split)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- a method defined only here ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig(TrainedConfig):
    dim: int = field(default=16, metadata={"help": "toy: output dimension."})
    temperature: float = 0.1


class Toy(TrainedAligner):
    """One linear map per modality on the global features, trained with InfoNCE."""

    Config = ToyConfig
    run_defaults = {"epochs": 5, "batch_size": 8, "patience": 0}

    def build(self, di: int, dt: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w_img = nn.Parameter(torch.randn(di, self.config.dim, generator=g) / di**0.5)
        self.w_txt = nn.Parameter(torch.randn(dt, self.config.dim, generator=g) / dt**0.5)

    def setup(self, data, seed):
        self.build(data.train.stores.image.layout.dim, data.train.stores.text.layout.dim, seed)

    @classmethod
    def blank(cls, config, shapes):
        out = cls(config)
        out.build(base.saved_size(shapes, "w_img", 0), base.saved_size(shapes, "w_txt", 0))
        return out

    def loss(self, batch, ctx: StepContext):
        hi = ctx.gather(l2n(batch.image.cls.float() @ self.w_img), batch.sizes)
        ht = ctx.gather(l2n(batch.text.pooled.float() @ self.w_txt), batch.sizes)
        return info_nce(hi, ht, self.config.temperature), {}

    @property
    def val_temperature(self):
        return self.config.temperature

    def image_global(self, rows: ImageRows):
        return l2n(rows.cls.float() @ self.w_img.detach())

    def text_global(self, rows: TextRows):
        return l2n(rows.pooled.float() @ self.w_txt.detach())

    def image_dense(self, patches):
        return l2n(patches.float() @ self.w_img.detach())


@pytest.fixture
def toy():
    """Registered for one test only: the global registry never keeps it."""
    base.METHODS.register("toy", Toy)
    yield Toy
    base.METHODS.unregister("toy")


def test_a_method_defined_in_a_test_trains_resumes_and_loads(tmp_path, world_features, toy):
    out = tmp_path / "toy"
    args = ["align", "--method", "toy", "--shards", shards(world_features), "--val-fraction", "0.25", "--no-progress"]
    assert main([*args, "--out", str(out), "-p", "dim=8"]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"] == "toy" and meta["run"]["epochs"] == 5 and len(meta["history"]) == 5
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]
    back = load_aligner(out)
    assert type(back) is Toy and back.w_img.shape[1] == 8
    assert meta["heldout"]["heldout_mean_r1"] >= 0


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        base.register_method("pal")(type("Other", (Toy,), {}))
    assert get_method("pal").__name__ == "PAL"


@pytest.fixture
def restored_registry():
    before = set(base.METHODS.names())
    yield
    for name in set(base.METHODS.names()) - before:
        base.METHODS.unregister(name)


def test_the_docs_example_is_a_working_method(tmp_path, world_features, monkeypatch, restored_registry):
    """docs/align.md shows a new method in one file; that code, run as written, trains through `pipe align`."""
    text = (ROOT / "docs" / "align.md").read_text()
    code = re.search(r"```python\n(# align/scaled\.py.*?)```", text, re.S).group(1)
    assert 30 <= len(code.strip().splitlines()) <= 60
    module = types.ModuleType("docs_example")
    monkeypatch.setitem(sys.modules, "docs_example", module)
    exec(compile(code, "docs/align.md", "exec"), module.__dict__)
    assert (
        main(
            [
                "align",
                "--method",
                "scaled",
                "--shards",
                shards(world_features),
                "--out",
                str(tmp_path / "s"),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--no-progress",
                "-p",
                "dim=8",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "s" / "run.json").read_text())["complete"]
    back = load_aligner(tmp_path / "s")  # built by its `blank`, loaded strictly
    assert type(back).__name__ == "Scaled" and [n for n, _ in back.named_parameters()] == ["img", "txt", "log_t"]
    assert back.img.shape == (32, 8) and set(load_file(str(tmp_path / "s" / "weights.safetensors"))) == {
        "img",
        "txt",
        "log_t",
    }


# -- one held-out split, one meaning of patience ------------------------------------------------------------------
@pytest.mark.parametrize("method", trained())
def test_patience_zero_never_stops_early(tmp_path, world_features, method):
    out = tmp_path / method
    assert (
        main(
            [
                "align",
                *method_flags(method),
                "--shards",
                shards(world_features),
                "--out",
                str(out),
                "--patience",
                "0",
                "--epochs",
                "6",
                "--val-fraction",
                "0.25",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / "run.json").read_text())
    assert len(meta["history"]) == 6 and meta["fit"]["stopped"] == "epochs"


def test_patience_stops_after_that_many_epochs_without_a_better_heldout_loss(tmp_path, world_features):
    # a rate this high makes the held-out loss of the linear heads worse after the first epochs (with the former
    # defaults: normalised, centred inputs, constant rate, no clipping)
    out = tmp_path / "p"
    former = [
        "--normalize-inputs",
        "--center",
        "--beta2",
        "0.999",
        "--schedule",
        "constant",
        "--grad-clip",
        "0",
        "--lr-finder",
        "0",
    ]
    assert (
        main(
            [
                "align",
                "--method",
                "linear",
                "--dim",
                "8",
                "--lr",
                "3",
                *former,
                "--shards",
                shards(world_features),
                "--out",
                str(out),
                "--patience",
                "2",
                "--epochs",
                "40",
                "--val-fraction",
                "0.25",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((out / "run.json").read_text())
    losses = [h["val_loss"] for h in meta["history"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert meta["fit"]["stopped"] == "patience" and len(losses) < 40
    assert len(losses) == best + 1 + 2 and meta["best_epoch"] == best  # two epochs after the best, then stop


# -- nothing non-finite ends "complete" -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--lr", "1e30"], ["--method", "linear", "--lr", "1e30", "--lr-finder", "0"]])
def test_parameters_that_blow_up_stop_training(tmp_path, world_features, capsys, flags):
    out = tmp_path / "inf"
    code = main(
        [
            "align",
            *flags,
            "--shards",
            shards(world_features),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err and err.count("\n") == 1, err
    assert not json.loads((out / "run.json").read_text())["complete"]
    assert not (out / "anchors.safetensors").exists() and not (out / "weights.safetensors").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "inf"),
        ("--tau", "inf"),
        ("--tau-p", "nan"),
        ("--seed", "-1"),
        ("--weight-decay", "-5"),
        ("--warmup-epochs", "inf"),
        ("--memory-budget", "1e400"),
        ("--schedule", "linear"),
    ],
)
def test_absurd_values_are_refused_up_front(tmp_path, world_features, capsys, flag, value):
    code = main(
        ["align", "--shards", shards(world_features), "--out", str(tmp_path / "x"), flag, value, "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_an_option_of_another_method_is_refused(tmp_path, world_features, capsys):
    code = main(
        [
            "align",
            "--method",
            "linear",
            "--anchors",
            "8",
            "--shards",
            shards(world_features),
            "--out",
            str(tmp_path / "x"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--anchors" in err and "linear" in err and err.count("\n") == 1, err
