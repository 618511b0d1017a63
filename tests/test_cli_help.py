"""`pipe --help` and every `--help`: no torch, zarr, matplotlib or transformers import, commands in workflow order with
whole one-line summaries, `pipe align` grouped in panels with the defaults that will run, no Python types shown."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from pipe_align.pipelines import cli_spec
from pipe_align.pipelines.cli import WORKFLOW, app, main

HEAVY = ("torch", "zarr", "matplotlib", "transformers", "dask")
HELPS = [
    ["--help"],
    ["extract", "--help"],
    ["align", "--help"],
    ["eval", "--help"],
    ["eval", "segmentation", "--help"],
    ["report", "--help"],
    ["segment", "--help"],
    ["encoders", "prepare", "--help"],
    ["reproduce", "--help"],
]


@pytest.fixture
def spec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPE_CACHE", str(tmp_path))
    return tmp_path


def help_text(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "220")  # rich wraps at the terminal's width; wide enough for one line per entry
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_help_imports_no_heavy_module(spec_cache):
    cli_spec.spec()  # the first call after a source change builds the cache (that one imports torch)
    code = (
        "import json, sys\nfrom pipe_align.pipelines.cli import main\n"
        f"codes = [main(a) for a in {HELPS!r}]\n"
        f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    env = {**os.environ, "PIPE_CACHE": str(spec_cache), "COLUMNS": "120"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    codes, heavy = json.loads(out.strip().splitlines()[-1])
    assert codes == [0] * len(HELPS)
    assert heavy == []


def test_spec_from_cache_equals_registries(spec_cache):
    first = cli_spec.spec()
    files = list((spec_cache / "cli").glob("*.json"))
    assert [f.stem for f in files] == [cli_spec.source_key()]
    assert cli_spec.spec() == first == json.loads(json.dumps(cli_spec.build()))
    files[0].write_text("{not json", encoding="utf-8")  # a damaged cache file is rebuilt, never half-read
    assert cli_spec.spec() == first


def test_every_config_field_is_an_align_option():
    """The reference: the dataclasses themselves. Every field of RunConfig and of every method's config is an option
    of `pipe align`, with the same name, so the cached spec drops nothing."""
    import typer.main

    from pipe_align.align.loop import RunConfig
    from pipe_align.align.methods import METHODS

    align = typer.main.get_command(app).commands["align"]
    options = {p.name for p in align.params}
    expected = {f.name for f in dataclasses.fields(RunConfig)}
    for method in METHODS.values():
        expected |= {f.name for f in dataclasses.fields(method.Config)}
    assert expected <= options


def test_commands_in_workflow_order_with_whole_summaries(capsys, monkeypatch):
    out = help_text(capsys, monkeypatch)
    listed = re.findall(r"^│ (\w+) {2,}", out, flags=re.M)
    assert listed == list(WORKFLOW)
    command = typer_command("align")
    summary = " ".join(command.help.split("\n\n")[0].split())
    assert summary in " ".join(out.split())  # the whole first paragraph, on one line, not cut with "..."
    assert "..." not in out.replace("COMMAND [ARGS]...", "")


def typer_command(name: str):
    import typer.main

    return typer.main.get_command(app).commands[name]


def test_align_help_panels_defaults_and_placeholders(capsys, monkeypatch):
    out = help_text(capsys, monkeypatch, "align")
    panels = re.findall(r"╭─ (.+?) ─", out)
    assert panels[:3] == ["Options", "Run options (every method)", "PAL options"]
    for baseline in ("asif", "cca/csa", "mlp", "sotalign"):
        assert f"{baseline} options" in panels
    # PAL's preset decides these when they are not given: the help says so instead of the paper preset's value.
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^│ +(--[\w-]+) .*$", out, flags=re.M)}
    assert "set by --preset (paper 100, small 0)" in lines["--lr-finder"]
    assert "set by --preset (paper 512" in lines["--anchors"]
    for line in lines.values():
        assert not re.search(r"<\w|list\[", line), line  # no <int>, <str>, <path>, <list[str]>


@pytest.mark.parametrize("argv", [["info"], ["eval", "retrieval"], ["extract"], ["segment"]])
def test_no_python_types_in_any_help(capsys, monkeypatch, argv):
    out = help_text(capsys, monkeypatch, *argv)
    assert not re.search(r"<(int|float|str|bool|path|list\[[^]]*\])>", out)
