"""`pipe segment`, `pipe classify`, `pipe search`: a trained run applied to your own images and words. Glue only:
options -> `pipelines.api` (the model), `pipelines.image_index` (folders, the search cache), `evaluate.overlay`
(the PNGs); results printed or written.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from pipe_align.extract.errors import PipeError

RUN = typer.Option(..., help="Run dir written by `pipe align` (its run.json names the encoders to rebuild).")
LABELS = typer.Option(..., help="Comma-separated labels, e.g. 'cat,dog,grass'.")
TEMPLATES = typer.Option(
    None,
    help="Prompt templates, '|'-separated, each with {} for the label "
    "(default: the CLIP templates the eval's class prompts use).",
)
DEVICE = typer.Option("auto", help="auto, cpu or cuda.")
COMPUTE = typer.Option(
    "store",
    help="Encoder forward dtype: store (the one the run's training stores were computed "
    "in), or as `pipe extract --compute-dtype`: auto, float32, bfloat16, float16.",
)
BATCH = typer.Option(32, help="Images per encoder forward.")
PROGRESS = typer.Option(True, help="Show a progress bar.")
STRICT = typer.Option(False, help="Fail on an unreadable image instead of skipping it.")


def parse_labels(text: str) -> list[str]:
    """Comma-separated labels, each checked as the API checks it (visible, no line break or control character)."""
    from .api import check_labels

    labels = [x.strip() for x in text.split(",")]
    if not any(labels):
        raise PipeError("--labels: no labels given (e.g. --labels 'cat,dog,grass')")
    if not all(labels):
        raise PipeError(f"--labels {text!r}: an empty label between commas")
    return check_labels(labels, "--labels")


def _templates(text: str | None) -> list[str] | None:
    return text.split("|") if text else None


@contextmanager
def progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (images, images/s, ETA) when asked for and there is more than one image."""
    if not enabled or total < 2:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        transient=True,
    )
    task, t0, done = bar.add_task(label, total=total, rate=""), time.perf_counter(), [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(task, advance=n, rate=f"{done[0] / max(time.perf_counter() - t0, 1e-9):.1f} images/s")

    with bar:
        yield advance


def _load(run: Path, device: str, batch_size: int, compute_dtype: str):
    from .api import load

    return load(run, device=device, batch_size=batch_size, compute_dtype=compute_dtype)


def _check_compute(compute_dtype: str) -> str:
    from .api import check_compute_choice

    return check_compute_choice(compute_dtype, "--compute-dtype")


def out_names(images: list[Path]) -> list[str]:
    """One output stem per input image, unique even on a case-insensitive file system. Every input's own stem is
    reserved for it (the first image of that stem keeps it); a later image of the same stem gets the first free
    -2, -3, ..., skipping every stem reserved by another input, so `d1/a.png d2/a.png a-2.png` gives a, a-3, a-2.
    The names depend only on the list of inputs and its order."""
    reserved = {p.stem.casefold() for p in images}
    used: set[str] = set()
    out = []
    for p in images:
        name, n = p.stem, 1
        while name.casefold() in used or (n > 1 and name.casefold() in reserved):
            n += 1
            name = f"{p.stem}-{n}"
        used.add(name.casefold())
        out.append(name)
    return out


def label_index(names: list[str]) -> bytes:
    """labels.txt: one line per label index, index TAB label (labels never hold a line break: `check_label`)."""
    return "".join(f"{i}\t{n}\n" for i, n in enumerate(names)).encode("utf-8")


def check_out_folder(out: Path, names: list[str], images: list[Path], stems: list[str]) -> None:
    """An --out folder that already holds label PNGs for other labels is refused: its labels.txt is what gives their
    pixel values names, and rewriting it would rename every older map. An output that would replace one of the
    input images is refused too."""
    index = out / "labels.txt"
    if index.is_file():
        try:
            old = [line.split("\t", 1) for line in index.read_text(encoding="utf-8").splitlines()]
            ok = all(len(x) == 2 and x[0] == str(i) for i, x in enumerate(old))
        except (OSError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise PipeError(f"--out {out}: its labels.txt is not one written by `pipe segment`; use another --out")
        had = [x[1] for x in old]
        if had != names:
            raise PipeError(
                f"--out {out}: holds label maps for other labels ({', '.join(had)}; now "
                f"{', '.join(names)}) and their labels.txt would no longer name them; use another --out "
                "or the same --labels and --background"
            )
    inputs = {p.resolve() for p in images}
    for stem in stems:
        for kind in ("overlay", "labels"):
            target = out / f"{stem}.{kind}.png"
            if target.resolve() in inputs:
                raise PipeError(f"--out {out}: writing {target} would replace that input image; use another --out")


def segment(
    images: list[Path] = typer.Argument(..., help="Image files to segment."),
    run: Path = RUN,
    labels: str = LABELS,
    out: Path = typer.Option(
        Path("segment-out"), help="Folder for <image>.overlay.png, <image>.labels.png and labels.txt."
    ),
    background: str = typer.Option(
        "background",
        help="A background prompt that competes with the labels, as in `pipe eval segmentation`; '' for none.",
    ),
    background_threshold: float | None = typer.Option(
        None, help="Also mark a pixel background when its best label score is below this (docs/apply.md: picking it)."
    ),
    background_bias: float | None = typer.Option(
        None,
        help="Also mark a pixel background when its best label score is below the background's + this (docs/apply.md).",
    ),
    templates: str | None = TEMPLATES,
    device: str = DEVICE,
    compute_dtype: str = COMPUTE,
    progress: bool = PROGRESS,
) -> None:
    """Segment images with your own labels: a colour overlay PNG and the label map (indexed PNG) per image."""
    import numpy as np  # here, not at the top: `pipe --help` imports this module and should not pay for them

    from pipe_align.evaluate.overlay import label_png, overlay_png, write_file
    from pipe_align.extract.datasets.base import open_rgb

    from .api import check_label, check_rule_value, segment_names

    _check_compute(compute_dtype)
    bg = check_label(background, "--background") if background.strip() else None
    labels_given = parse_labels(labels)
    names, _ = segment_names(labels_given, bg, "--labels")
    if len(names) > 256:
        raise PipeError(f"--labels: {len(names)} labels with the background; an indexed PNG holds at most 256")
    threshold = check_rule_value("--background-threshold", background_threshold)
    bias = check_rule_value("--background-bias", background_bias, minimum=0.0)
    if (threshold is not None or bias is not None) and bg is None:
        raise PipeError("--background-threshold/--background-bias need a background label (--background)")
    stems = out_names(images)
    check_out_folder(out, names, images, stems)
    model = _load(run, device, 1, compute_dtype)
    written = []
    with progress_bar(progress, "segment", len(images)) as advance:
        for path, stem in zip(images, stems):
            image = open_rgb(path)
            seg = model.segment(
                image, labels_given, background=bg, templates=_templates(templates), threshold=threshold, bias=bias
            )
            label_map = seg.labels.cpu().numpy()
            if not written:  # before the first label PNG, which it names; after the first image is read
                written.append(write_file(out / "labels.txt", label_index(names)))
            rules = [f"background {k} {v:g}" for k, v in (("threshold", threshold), ("bias", bias)) if v is not None]
            title = ", ".join([f"{path.name}: {run.name} ({model.method})", *rules])
            written.append(
                overlay_png(out / f"{stem}.overlay.png", np.asarray(image), label_map, seg.names, seg.background, title)
            )
            written.append(label_png(out / f"{stem}.labels.png", label_map))
            advance(1)
    for p in written[1:]:
        typer.echo(f"wrote {p}")
    typer.echo(f"wrote {out / 'labels.txt'} (label index -> name; the labels PNGs hold these indices)")


def classify(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    run: Path = RUN,
    labels: str = LABELS,
    out: Path = typer.Option(Path("classify.csv"), help="CSV to write: path, then label and score for the top k."),
    top_k: int = typer.Option(5, help="Labels per image in the CSV."),
    templates: str | None = TEMPLATES,
    device: str = DEVICE,
    compute_dtype: str = COMPUTE,
    batch_size: int = BATCH,
    strict: bool = STRICT,
    progress: bool = PROGRESS,
) -> None:
    """Classify a folder of images against your labels: a CSV of the top-k labels with cosine scores."""
    from pipe_align.extract.files import write_text

    from .image_index import list_images

    _check_compute(compute_dtype)
    names = parse_labels(labels)
    if top_k < 1:
        raise PipeError(f"--top-k must be >= 1, got {top_k}")
    paths = list_images(folder)
    model = _load(run, device, batch_size, compute_dtype)
    weights = model.classifier(names, _templates(templates))
    with progress_bar(progress, "classify", len(paths)) as advance:
        emb, kept, skipped = model.encode_files(paths, skip_unreadable=not strict, on_images=advance)
    if not kept:
        raise PipeError(f"{folder}: none of its {len(paths)} images is readable")
    scores, idx = (emb @ weights.T).topk(min(top_k, len(names)), dim=1)
    k = idx.shape[1]
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["path", *[c for j in range(1, k + 1) for c in (f"label_{j}", f"score_{j}")]])
    for row, (s, i) in zip(kept, zip(scores.tolist(), idx.tolist())):
        w.writerow([str(paths[row]), *[v for j in range(k) for v in (names[i[j]], f"{s[j]:.4f}")]])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, table.getvalue())  # whole or not at all, never through a planted link
    _report_skipped([(paths[i], why) for i, why in skipped])
    typer.echo(f"wrote {out} ({len(kept)} images, top {k} of {len(names)} labels)")


def search(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    run: Path = RUN,
    query: list[str] = typer.Option(..., help="A sentence to search for (repeat for several)."),
    top_k: int = typer.Option(10, help="Images shown per query."),
    cache: bool = typer.Option(
        True, help="Keep the folder's image embeddings in RUN/cache and reuse them while the images are unchanged."
    ),
    device: str = DEVICE,
    compute_dtype: str = COMPUTE,
    batch_size: int = BATCH,
    strict: bool = STRICT,
    progress: bool = PROGRESS,
) -> None:
    """Search a folder of images with sentences: the best-matching images, best first."""
    from pipe_align.extract.datasets.base import is_blank

    from .image_index import cache_file, folder_embeddings, list_images

    _check_compute(compute_dtype)
    if top_k < 1:
        raise PipeError(f"--top-k must be >= 1, got {top_k}")
    for q in query:  # as `pipe extract` refuses such a caption: it would score every image alike
        if is_blank(q):
            raise PipeError(f"--query {q!r}: no visible character (only blanks, zero-width or control characters)")
    total = len(list_images(folder))  # a missing or empty folder fails before the encoders load
    model = _load(run, device, batch_size, compute_dtype)
    text = model.encode_text(query)
    with progress_bar(progress, "search: images", total) as advance:
        index = folder_embeddings(model, folder, strict=strict, use_cache=cache, on_images=advance)
    if index.cache_problem:
        typer.echo(
            f"search cache {cache_file(model, folder)} was damaged ({index.cache_problem}); encoded the folder again",
            err=True,
        )
    scores, idx = (text @ index.embeddings.T).topk(min(top_k, len(index.paths)), dim=1)
    for q, s, i in zip(query, scores.tolist(), idx.tolist()):
        typer.echo(f"{q}")
        for rank, (score, j) in enumerate(zip(s, i), start=1):
            typer.echo(f"  {rank:3d}. {score:.4f}  {index.paths[j]}")
    _report_skipped(index.skipped)
    reused = len(index.paths) + len(index.skipped) - index.encoded
    where = f"; cache {index.cache}" if index.cache else ""
    typer.echo(f"{len(index.paths)} images: {index.encoded} encoded now, {reused} from the cache{where}", err=True)


def _report_skipped(skipped: list[tuple[Path, str]]) -> None:
    if skipped:
        typer.echo(f"skipped {len(skipped)} unreadable images:", err=True)
        for path, why in skipped:
            typer.echo(f"  {path}: {why}", err=True)


COMMANDS = (segment, classify, search)
