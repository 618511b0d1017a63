"""Colour overlays of a predicted label map on the user's own image (`pipe segment`), in the palette that the eval's
figures use; the label PNG keeps the VOC colour map of mask files. Plain arrays in, files out; drawn on a bare Agg
`Figure`, never through pyplot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from pipe_align.extract.datasets.base import voc_palette
from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_bytes

from .figures import colorize


def blend(image: np.ndarray, labels: np.ndarray, background: int | None, alpha: float = 0.65) -> np.ndarray:
    """[H, W, 3] uint8: the image with each labelled pixel tinted by its class colour (background left as it is)."""
    rgb = image.astype(np.float64) / 255.0
    tinted = (1 - alpha) * rgb + alpha * colorize(labels)
    if background is not None:
        tinted = np.where((labels == background)[..., None], rgb, tinted)
    return (np.clip(tinted, 0, 1) * 255).round().astype(np.uint8)


def overlay_png(
    path: Path, image: np.ndarray, labels: np.ndarray, names: Sequence[str], background: int | None, title: str
) -> Path:
    """The image and its overlay side by side, with a legend of the labels that occur (and their pixel share)."""
    data = io.BytesIO()
    overlay_figure(image, labels, names, background, title).savefig(data, format="png", bbox_inches="tight")
    return write_file(path, data.getvalue())


def overlay_figure(
    image: np.ndarray, labels: np.ndarray, names: Sequence[str], background: int | None, title: str
) -> Figure:
    """Each legend swatch is the mean colour of its label's pixels in the overlay, the tint blended with the image
    as the reader sees it (the background's: the image itself), not the pure palette colour."""
    h, w = labels.shape
    fig = Figure(figsize=(2 * 4.0 * w / max(h, w) + 0.4, 4.0 * h / max(h, w) + 1.1), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    blended = blend(image, labels, background)
    for ax, data, name in ((axes[0], image, "image"), (axes[1], blended, "labels")):
        ax.imshow(data, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    counts = np.bincount(labels.ravel(), minlength=len(names))
    share = 100 * counts / labels.size
    handles = [
        Patch(
            color=blended[labels == i].mean(axis=0) / 255.0,
            label=f"{names[i]} {share[i]:.0f}%" if share[i] >= 1 else f"{names[i]} <1%",
        )
        for i in np.flatnonzero(counts)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    return fig


def label_png(path: Path, labels: np.ndarray) -> Path:
    """The label map as an indexed PNG (pixel value = label index, shown in the VOC palette), lossless."""
    if labels.max(initial=0) > 255:
        raise PipeError(f"{path}: an indexed PNG holds at most 256 labels")
    png = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes())
    png.putpalette(voc_palette())
    data = io.BytesIO()
    png.save(data, format="PNG")
    return write_file(path, data.getvalue())


def write_file(path: Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all (extract/files.py: an exclusive temporary renamed over `path`); a
    full disk or a file-size limit is one line naming the file, and `path` keeps what it held before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)
    return path
