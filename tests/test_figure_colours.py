"""Figures a person can read: class colours told apart, legend swatches that are the colours on screen, axes in the
unit of their numbers, colourbars on anchor maps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipe_align.evaluate import figures
from pipe_align.evaluate.overlay import overlay_figure


def cielab(rgb) -> np.ndarray:
    """sRGB in [0, 1] -> CIE L*a*b* (D65), written out from the CIE definitions (IEC 61966-2-1 for sRGB)."""
    out = []
    for r, g, b in np.asarray(rgb, dtype=float).reshape(-1, 3):
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        x = (0.4124 * lin[0] + 0.3576 * lin[1] + 0.1805 * lin[2]) / 0.95047
        y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
        z = (0.0193 * lin[0] + 0.1192 * lin[1] + 0.9505 * lin[2]) / 1.08883
        f = [t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in (x, y, z)]
        out.append((116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])))
    return np.array(out)


def delta_e(c1, c2) -> float:
    """CIE76 colour difference: about 2.3 is just noticeable; classes need far more to be named apart at a glance."""
    return float(np.linalg.norm(cielab(c1)[0] - cielab(c2)[0]))


def test_palette_tells_classes_apart():
    pal = figures.PALETTE
    assert pal.shape == (256, 3)
    assert tuple(pal[0]) == (0, 0, 0) and np.allclose(pal[255], (224 / 255, 224 / 255, 192 / 255))  # VOC's bg, void
    classes = pal[1:21]  # VOC's 20 object classes, the world's 12
    assert min(delta_e(a, b) for a, b in itertools.combinations(classes, 2)) >= 30
    assert min(delta_e(c, (0, 0, 0)) for c in pal[1:255]) >= 25  # nothing near-black on the black background


def test_lab_conversion_matches_the_written_definition():
    rgb = np.random.default_rng(0).random((50, 3))
    assert np.allclose(figures.srgb_to_lab(rgb), cielab(rgb), atol=1e-9)


def test_overlay_legend_swatches_are_the_blended_colours():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (24, 32))
    fig = overlay_figure(image, labels, ["background", "cat", "dog"], 0, "t")
    shown = np.asarray(fig.axes[1].images[0].get_array(), dtype=float)  # the overlay as drawn
    swatches = [h.get_facecolor()[:3] for h in fig.legends[0].legend_handles]
    for i, swatch in enumerate(swatches):
        assert np.allclose(swatch, shown[labels == i].mean(axis=0) / 255.0, atol=1e-6)
    assert np.allclose(swatches[0], image[labels == 0].mean(axis=0) / 255.0, atol=1e-6)  # background: the image


@pytest.fixture
def drawn(monkeypatch):
    """The Figure a figure function would save."""
    kept = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: kept.append(fig) or path)
    return kept


def test_class_iou_axis_is_in_the_percent_it_prints(tmp_path, drawn):
    figures.class_iou_bars(tmp_path / "x.png", ["a", "b", "c"], [0.25, float("nan"), 0.8], "t")
    ax = drawn[0].axes[0]
    assert ax.get_xlabel() == "IoU (%)"
    assert [p.get_width() for p in ax.patches] == pytest.approx([25.0, 0.0, 80.0])
    assert [t.get_text() for t in ax.texts] == ["25.0", "n/a", "80.0"]


def test_anchor_maps_have_a_colourbar_each(tmp_path, drawn):
    maps = np.random.default_rng(2).uniform(-0.2, 0.6, (3, 4, 4))
    figures.anchor_maps(tmp_path / "m.png", [(None, [5, 9, 2], [0.4, 0.3, 0.2], maps)], "t")
    bars = [ax for ax in drawn[0].axes if ax.get_ylabel() == "cos(patch, anchor)"]
    assert len(bars) == 3
