"""What a person sees while training and loading: per-epoch lines in RUN/train.log (on the terminal only with
--verbose), one summary line at the end, and no transformers "Loading weights" bar from pipe's own loading."""

from __future__ import annotations

import re

import matplotlib
import pytest

from pipe_align.align.loop import RunConfig, summary_line
from pipe_align.pipelines.cli import main

EPOCH_LINE = re.compile(r"^linear epoch \d+ .*train_loss", re.M)


def align(feats, out, *extra: str) -> int:
    shards = str(feats / "world" / "train")
    return main(
        [
            "align",
            "--method",
            "linear",
            "--shards",
            shards,
            "--out",
            str(out),
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--patience",
            "0",
            "--dim",
            "16",
            "--lr-finder",
            "0",
            "--val-fraction",
            "0.25",
            *extra,
        ]
    )


@pytest.fixture
def svg_backend():
    """A backend that is not Agg, as a notebook's inline or a desktop backend would be."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(before)


def test_epochs_go_to_the_log_and_the_terminal_gets_a_summary(
    tmp_path, world_features, capsys, one_thread, svg_backend
):
    assert align(world_features, tmp_path / "run") == 0
    # loss.png is drawn on a bare Figure: the caller's matplotlib backend survives (matplotlib.use("Agg") switched it)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"
    err = capsys.readouterr().err
    assert not EPOCH_LINE.search(err)  # no per-epoch lines on the terminal without --verbose
    summary = [line for line in err.splitlines() if "stopped at epoch" in line]
    assert len(summary) == 1
    expected = r"linear: stopped at epoch 2, reached --epochs 3; best epoch [0-2] \(held-out loss [\d.]+\) kept"
    assert re.fullmatch(expected, summary[0])
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8").splitlines()
    assert [int(re.search(r"epoch (\d+)", line).group(1)) for line in log[:-1]] == [0, 1, 2]
    assert all(EPOCH_LINE.match(line) for line in log[:-1])
    assert log[-1] == summary[0]


def test_verbose_prints_the_epoch_lines_too_and_a_fresh_training_starts_a_fresh_log(
    tmp_path, world_features, capsys, one_thread
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("linear epoch 7 train_loss 9 (an earlier training)\n", encoding="utf-8")
    assert align(world_features, out, "--verbose") == 0
    err = capsys.readouterr().err
    log = (out / "train.log").read_text(encoding="utf-8").splitlines()
    assert "earlier" not in "\n".join(log)
    assert len(log) == 4 and EPOCH_LINE.findall(err) == [m.group(0) for m in map(EPOCH_LINE.match, log[:-1])]


def test_summary_line_says_where_which_and_why():
    run = RunConfig(epochs=100, patience=20)
    best = {"epoch": 41, "val_loss": 1.23456}
    assert summary_line("pal", 62, best, "patience", run) == (
        "pal: stopped at epoch 61, no better held-out loss for 20 epochs (--patience); best epoch 41 (held-out loss "
        "1.2346) kept"
    )
    assert summary_line("pal", 100, {"epoch": 99, "val_loss": float("inf")}, "epochs", run) == (
        "pal: stopped at epoch 99, reached --epochs 100; no held-out pairs, epoch 99 kept"
    )


def test_loading_an_encoder_shows_no_loading_bar_and_keeps_the_setting(tiny_dinov2, capfd):
    from transformers.utils import logging as hf_logging

    from pipe_align.extract.encoders import load_encoder

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # a notebook's default: bars on
    try:
        load_encoder(f"hf:{tiny_dinov2}")
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()  # pipe switched it off only while it loaded
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_summary_line_names_the_initial_state_when_it_is_kept():
    """A method whose starting point is a candidate (SOTAlign's teacher) may keep it: no "epoch -1" in the line."""
    run = RunConfig(epochs=50, patience=5)
    line = summary_line("sotalign", 5, {"epoch": -1, "val_loss": 5.8032}, "patience", run)
    assert line.endswith("the state before the first epoch (held-out loss 5.8032) kept") and "-1" not in line, line
