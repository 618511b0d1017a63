"""No global side effect from pipe's figures: the demo draws on bare `Figure`s, so a notebook's matplotlib backend
survives (`matplotlib.use("Agg")` used to switch it; training's loss.png: tests/test_logs.py); loss.png marks the
epoch the run kept."""

from __future__ import annotations

import matplotlib
import pytest

from pipe_align.align.run import loss_figure


@pytest.fixture
def svg_backend():
    """A backend that is not Agg, as a notebook's inline or a desktop backend would be."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(before)


def test_demo_probe_figure_leaves_the_backend_alone(tmp_path, svg_backend):
    from pipe_align.pipelines.demo import _write_ablation

    grid = [
        {"K": 64, "use_cls": False, "val_r1": 0.3},
        {"K": 128, "use_cls": False, "val_r1": 0.4},
        {"K": 128, "use_cls": True, "val_r1": 0.45},
    ]
    _write_ablation(tmp_path, grid, {"K": 128})
    assert (tmp_path / "k_ablation.png").is_file()
    assert matplotlib.get_backend() == "svg"


def test_loss_figure_marks_the_kept_epoch_in_nats():
    history = [
        {"epoch": e, "train_loss": 3.0 - 0.1 * e, "val_loss": 3.0 - 0.1 * min(e, 3) + 0.05 * max(0, e - 3)}
        for e in range(8)
    ]
    ax = loss_figure(history, "pal", best_epoch=3).axes[0]
    marks = [line for line in ax.lines if list(line.get_xdata()) == [3, 3]]
    assert len(marks) == 1 and marks[0].get_label() == "best epoch 3 (kept)"
    assert "best epoch 3 (kept)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_ylabel() == "loss (nats)" and ax.get_xlabel() == "epoch"
