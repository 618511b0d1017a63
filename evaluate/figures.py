"""PNG figures of evaluations, where a person would rather look than read numbers. Plain arrays in, a file out.

Figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas), never through pyplot: no global backend state,
no GUI, safe in threads and on machines without a display.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipe_align.extract.files import write_bytes


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in [0, 1], [..., 3]: the space where distances approximate perceived differences."""
    c = np.asarray(rgb, dtype=np.float64)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def categorical_palette() -> np.ndarray:
    """[256, 3] RGB in [0, 1] for class colours in figures: 0 (background) black and 255 (void) cream as in the VOC
    palette, and 1..254 picked greedily so that each next colour is the farthest in CIELAB from all chosen ones (the
    method of Glasbey, Heijden, Toh and Gray, "Colour displays for categorical images", 2007), over an RGB grid kept
    to lightness 30..90, so that no class is near-black on the black background. The VOC colour map puts classes
    8.8 CIELAB units apart among its first 21 (dark red, dark blue, olive next to each other); here they are 39."""
    levels = np.arange(0, 256, 15) / 255.0
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = srgb_to_lab(grid)
    keep = (lab[:, 0] >= 30) & (lab[:, 0] <= 90)
    grid, lab = grid[keep], lab[keep]
    fixed = np.array([[0.0, 0.0, 0.0], [224 / 255, 224 / 255, 192 / 255]])  # background, void
    nearest = np.linalg.norm(lab[:, None] - srgb_to_lab(fixed)[None], axis=-1).min(axis=1)
    picked = []
    for _ in range(254):
        i = int(nearest.argmax())
        picked.append(grid[i])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[i], axis=-1))
    return np.concatenate([fixed[:1], np.array(picked), fixed[1:]])


PALETTE = categorical_palette()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Rendered in memory, then written through an exclusive temporary (a planted link is never written through)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    write_bytes(path, buffer.getvalue())
    return path


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask -> RGB in the figures' palette (0 = background black and 255 = void cream, as in VOC)."""
    return PALETTE[np.asarray(mask, dtype=np.uint8)]


def seg_overlays(
    path: Path,
    samples: Sequence[tuple[np.ndarray | None, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    title: str,
    void: int = 255,
) -> Path:
    """One row per image: image, ground truth, prediction, with a legend of the classes that appear (`void`: the
    mask value of ignored pixels)."""
    fig = _figure(9, 3 * len(samples) + 0.6)
    axes = fig.subplots(len(samples), 3, squeeze=False)
    shown: set[int] = set()
    for r, (image, gt, pred) in enumerate(samples):
        panels = ((image, "image"), (colorize(gt), "ground truth"), (colorize(pred), "prediction"))
        for c, (data, name) in enumerate(panels):
            ax = axes[r][c]
            ax.axis("off")
            if data is not None:
                ax.imshow(data, interpolation="nearest")
            if r == 0:
                ax.set_title(name)
        shown |= {int(v) for v in np.unique(gt)} | {int(v) for v in np.unique(pred)}
    names = {i: n for i, n in enumerate(classes)} | {void: "void (ignored)"}
    handles = [Patch(color=PALETTE[i], label=names.get(i, str(i))) for i in sorted(shown)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=8, frameon=False)
    fig.suptitle(title)
    return save_figure(fig, path)


def class_iou_bars(path: Path, names: Sequence[str], ious: Sequence[float], title: str) -> Path:
    """Per-class IoU as horizontal bars (classes never seen, IoU NaN, are marked n/a)."""
    values = np.array(ious, dtype=np.float64)
    fig = _figure(7, 0.3 * len(names) + 1.2)
    ax = fig.subplots()
    y = np.arange(len(names))
    percent = 100 * np.nan_to_num(values)
    ax.barh(y, percent, color="tab:blue")
    for i, v in enumerate(values):
        text = "n/a" if np.isnan(v) else f"{100 * v:.1f}"
        ax.text(percent[i] + 1, i, text, va="center", fontsize=8)
    ax.set_yticks(y, labels=list(names), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title)
    return save_figure(fig, path)


def retrieval_examples(
    path: Path, samples: Sequence[tuple[np.ndarray | None, Sequence[str], Sequence[bool], Sequence[float]]], title: str
) -> Path:
    """Image queries with their top captions as text; captions of the query image are green and marked [+]."""
    fig = _figure(11, 2.6 * len(samples) + 0.5)
    axes = fig.subplots(len(samples), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 3]})
    for r, (image, captions, hits, scores) in enumerate(samples):
        axes[r][0].axis("off")
        if image is not None:
            axes[r][0].imshow(image)
        ax = axes[r][1]
        ax.axis("off")
        for j, (cap, hit, score) in enumerate(zip(captions, hits, scores, strict=True)):
            line = textwrap.shorten(f"{j + 1}. [{'+' if hit else ' '}] {score:.3f}  {cap}", 110)
            ax.text(
                0,
                1 - 0.18 * j,
                line,
                transform=ax.transAxes,
                va="top",
                fontsize=9,
                color="tab:green" if hit else "black",
                family="monospace",
            )
    fig.suptitle(title)
    return save_figure(fig, path)


def anchor_usage(path: Path, image_counts: np.ndarray, text_counts: np.ndarray | None, title: str) -> Path:
    """Tokens per anchor (argmax anchor of each token), anchors sorted by use: a long flat tail = unused anchors."""
    sides = [("image patches", image_counts)] + ([("text tokens", text_counts)] if text_counts is not None else [])
    fig = _figure(8, 2.8 * len(sides))
    axes = fig.subplots(len(sides), 1, squeeze=False)
    for ax, (name, counts) in zip(axes[:, 0], sides, strict=True):
        order = np.sort(counts)[::-1]
        ax.bar(np.arange(len(order)), order, width=1.0, color="tab:orange")
        ax.set_title(f"{name}: {int((counts > 0).sum())} of {len(counts)} anchors used")
        ax.set_xlabel("anchor (sorted by use)")
        ax.set_ylabel("tokens")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def dice_histogram(path: Path, matched: np.ndarray, mismatched: np.ndarray, k: int, title: str) -> Path:
    """Distribution of top-k anchor Dice for matched vs mismatched image-caption pairs."""
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    levels = np.arange(k + 1) / k
    width = 0.4 / k
    sides = (("matched", matched, "tab:green"), ("mismatched", mismatched, "tab:red"))
    for off, (name, values, colour) in zip((-width / 2, width / 2), sides, strict=True):
        share = [(np.isclose(values, v)).mean() if len(values) else 0.0 for v in levels]
        ax.bar(levels + off, share, width=width, color=colour, label=f"{name} (mean {np.mean(values):.2f})")
    ax.set_xlabel(f"Dice of top-{k} anchor sets")
    ax.set_ylabel("fraction of pairs")
    ax.legend()
    ax.set_title(title)
    return save_figure(fig, path)


def anchor_maps(
    path: Path, samples: Sequence[tuple[np.ndarray | None, Sequence[int], Sequence[float], np.ndarray]], title: str
) -> Path:
    """Per image: the image, then the cos maps of its most active anchors laid over it (each map on its own colour
    scale: where an anchor fires, not how strongly compared with other anchors; the profile value says that)."""
    cols = 1 + max(len(s[1]) for s in samples)
    fig = _figure(3 * cols, 3 * len(samples) + 0.5)
    axes = fig.subplots(len(samples), cols, squeeze=False)
    for r, (image, ids, vals, maps) in enumerate(samples):
        for ax in axes[r]:
            ax.axis("off")
        h, w = (image.shape[0], image.shape[1]) if image is not None else maps.shape[1:]
        if image is not None:
            axes[r][0].imshow(image)
        for c, (k, v, m) in enumerate(zip(ids, vals, maps, strict=True)):
            ax = axes[r][c + 1]
            if image is not None:
                ax.imshow(image)
            shown = ax.imshow(
                m,
                extent=(0, w, h, 0),
                alpha=0.6 if image is not None else 1.0,
                cmap="inferno",
                interpolation="bilinear",
            )
            ax.set_title(f"anchor {k} (profile {v:.2f})", fontsize=9)
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)  # each map has its own scale
            bar.set_label("cos(patch, anchor)", fontsize=8)
            bar.ax.tick_params(labelsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def grounding_maps(path: Path, examples: Sequence[dict], images: Sequence[np.ndarray | None], title: str) -> Path:
    """One row per phrase: the image with the phrase's boxes, then each heat map (upsampled over the image) with its
    maximum marked (green: inside a box, red: outside)."""
    from matplotlib.patches import Rectangle

    modes = sorted({m for e in examples for m in e["maps"]}, key=["tokens", "phrase"].index)
    fig = _figure(3.2 * (1 + len(modes)), 3.3 * len(examples) + 0.6)
    axes = fig.subplots(len(examples), 1 + len(modes), squeeze=False)
    for r, (ex, image) in enumerate(zip(examples, images, strict=True)):
        width, height = (image.shape[1], image.shape[0]) if image is not None else ex.get("size", (1, 1))
        panels = [(None, "boxes")] + [(m, f"{m} heat map") for m in modes]
        for c, (mode, name) in enumerate(panels):
            ax = axes[r][c]
            ax.axis("off")
            if image is not None:
                ax.imshow(image)
            if mode is not None and mode in ex["maps"]:
                heat, (x, y), hit = ex["maps"][mode]
                ax.imshow(heat, cmap="jet", alpha=0.5 if image is not None else 1.0, extent=(0, width, height, 0))
                ax.plot([x], [y], marker="*", markersize=14, color="lime" if hit else "red", markeredgecolor="k")
            for x0, y0, x1, y1 in ex["boxes"]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=2))
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.set_title(name if c else textwrap.shorten(f'"{ex["phrase"]}"', 40), fontsize=9)
        axes[r][0].text(
            0, -0.08, textwrap.fill(ex["caption"], 45), transform=axes[r][0].transAxes, fontsize=7, va="top"
        )
    fig.suptitle(title)
    return save_figure(fig, path)


def collapse_histograms(path: Path, sides: dict[str, dict[str, np.ndarray]], title: str) -> Path:
    """One panel per side (image, text): histograms of the per-sample within variance for the trained anchors, the
    shuffled control and the untrained anchors."""
    fig = _figure(5 * len(sides), 3.6)
    axes = fig.subplots(1, len(sides), squeeze=False)[0]
    for ax, (side, s) in zip(axes, sides.items(), strict=True):
        hi = max(float(np.max(v)) for v in s.values() if len(v)) or 1.0
        bins = np.linspace(0, hi, 40)
        for key, colour in (("within", "C0"), ("shuffled", "C1"), ("untrained", "C2")):
            ax.hist(s[key], bins=bins, alpha=0.55, color=colour, label=f"{key} (mean {np.mean(s[key]):.2g})")
        ax.set_title(f"{side} tokens", fontsize=10)
        ax.set_xlabel("mean over anchors of Var_t cos(token, anchor)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
