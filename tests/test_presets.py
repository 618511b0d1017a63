"""Presets as a hook of the method (`Aligner.presets`, `preset_plan`, `preset_search`): `pipe align --preset NAME`
(`--recipe` its hidden old name), a method without presets refusing one, `align/run.py` knowing no method by name, a
method defined here getting its own hooks called, run dirs of the old name still reused, and `[train] preset` of a
`pipe reproduce` recipe (`recipe` its old name there too)."""

from __future__ import annotations

import ast
import json
import uuid
from pathlib import Path

import pytest

import pipe_align.align.run as run_module
from pipe_align.align.base import METHODS, Plan, register_method
from pipe_align.align.loop import RunConfig
from pipe_align.align.methods import method_names
from pipe_align.align.procrustes import Procrustes
from pipe_align.align.run import AlignConfig, run_align
from pipe_align.pipelines.cli import main
from pipe_align.pipelines.recipe import load_recipe

QUICK = [
    "--anchors",
    "8",
    "--lr",
    "0.01",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--val-fraction",
    "0.25",
    "--no-progress",
]


def shards(feats: Path) -> str:
    return str(feats / "world" / "train")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -- the flag and its old name ---------------------------------------------------------------------------------------
def test_preset_flag_and_its_old_name_recipe_give_the_same_run(tmp_path, world_features, capsys):
    metas = []
    for flag in ("--preset", "--recipe"):
        out = tmp_path / flag.strip("-")
        assert main(["align", "--shards", shards(world_features), "--out", str(out), flag, "paper", *QUICK]) == 0
        assert "; preset paper: the PAL authors' settings" in capsys.readouterr().out
        metas.append(json.loads((out / "run.json").read_text()))
    for meta in metas:
        assert meta["preset"]["name"] == meta["preset"]["requested"] == "paper" and "recipe" not in meta
        assert meta["align"]["preset"] == "paper" and "recipe" not in meta["align"]
        assert meta["request"]["preset"] == "paper" and "recipe" not in meta["request"]
    assert metas[0]["key"] == metas[1]["key"] and metas[0]["config"] == metas[1]["config"]


def test_preset_and_recipe_both_given_is_one_line_error(tmp_path, world_features, capsys):
    out = tmp_path / "r"
    code = main(
        [
            "align",
            "--shards",
            shards(world_features),
            "--out",
            str(out),
            "--preset",
            "paper",
            "--recipe",
            "small",
            *QUICK,
        ]
    )
    err = one_line_error(capsys)
    assert code == 2 and "--preset paper" in err and "--recipe small" in err
    assert not out.exists()


def test_method_without_presets_refuses_preset_small(tmp_path, world_features, capsys):
    out = tmp_path / "r"
    code = main(
        [
            "align",
            "--shards",
            shards(world_features),
            "--out",
            str(out),
            "--method",
            "procrustes",
            "--preset",
            "small",
            "--no-progress",
        ]
    )
    err = one_line_error(capsys)
    assert code == 2 and "--preset small" in err and "method procrustes has no presets" in err
    assert not out.exists()
    # "none" is no preset: the method's own defaults
    assert (
        main(
            [
                "align",
                "--shards",
                shards(world_features),
                "--out",
                str(out),
                "--method",
                "procrustes",
                "--preset",
                "none",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((out / "run.json").read_text())["preset"] is None


def test_align_help_shows_preset_and_hides_its_old_name(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    assert main(["align", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--recipe" not in out


# -- align/run.py knows no method ------------------------------------------------------------------------------------
def _pipe_imports(path: Path) -> set[str]:
    """The pipe_align modules a source file imports (`from pipe_align.x import y` counts pipe_align.x and, where y is
    a module of that package, pipe_align.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipe_align")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipe_align"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _source(module: str) -> Path | None:
    root = Path(run_module.__file__).resolve().parent.parent  # the folder holding align/, extract/, ...
    parts = module.removeprefix("pipe_align.").split(".")
    path = root.joinpath(*parts).with_suffix(".py")
    return path if path.is_file() else None


def test_run_py_neither_imports_pal_nor_branches_on_a_method_name():
    run_py = Path(run_module.__file__)
    imported = _pipe_imports(run_py)
    pal_modules = {"pipe_align.align.pal", "pipe_align.align.pal_presets"}
    assert not imported & pal_modules, imported & pal_modules
    # nor through a helper module: every pipe_align module it imports, but the registry that loads every method
    for module in sorted(imported - {"pipe_align.align.methods"}):
        path = _source(module)
        if path is not None:
            assert not _pipe_imports(path) & pal_modules, f"{module} imports PAL"
    tree = ast.parse(run_py.read_text())
    names = set(method_names())
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.Name) and node.id == "PAL"), ast.unparse(node)
        if isinstance(node, ast.Compare):  # method == "pal", method in ("pal", ...)
            consts = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
            assert not consts & names, ast.unparse(node)


# -- a method's own preset hook --------------------------------------------------------------------------------------
@pytest.fixture
def toy_method():
    """Procrustes with two presets of its own: `quick` plans without data (dim 2), `wide` defers to its search (dim
    3). Registered under a name no other test sees, and removed afterwards."""
    name = f"toy-presets-{uuid.uuid4().hex[:8]}"

    class ToyPresets(Procrustes):
        presets = ("quick", "wide")
        calls: list[tuple] = []

        @classmethod
        def preset_plan(cls, preset, params, run, n_train):
            cls.calls.append(("plan", preset, dict(params), n_train))
            if preset == "wide":
                return None
            record = {"requested": preset, "name": preset, "why": "toy", "summary": f"{preset}: dim 2"}
            return Plan(params | {"dim": 2}, run.resolved(cls), record)

        @classmethod
        def preset_search(cls, preset, params, run, data, dp=None, say=False):
            cls.calls.append(("search", preset, len(data.train), len(data.val) if data.val is not None else 0))
            record = {"requested": preset, "name": preset, "why": "toy", "summary": f"{preset}: dim 3"}
            return Plan(params | {"dim": 3}, run.resolved(cls), record)

    register_method(name)(ToyPresets)
    try:
        yield ToyPresets
    finally:
        METHODS.unregister(name)


def test_run_align_calls_the_methods_own_preset_hooks(tmp_path, world_features, toy_method):
    run = RunConfig(val_fraction=0.25)
    first = run_align(
        AlignConfig(shards(world_features), str(tmp_path / "q"), method=toy_method.name, run=run), progress=False
    )
    assert toy_method.calls == [("plan", "quick", {}, 18)]  # no --preset: the method's first; 24 pairs, 6 held out
    assert first.meta["config"]["dim"] == 2 and first.meta["fit"]["dim"] == 2
    assert first.meta["preset"]["name"] == "quick" and first.meta["preset"]["params"] == {"dim": 2}
    toy_method.calls.clear()
    wide = AlignConfig(shards(world_features), str(tmp_path / "w"), method=toy_method.name, run=run, preset="wide")
    res = run_align(wide, progress=False)
    assert toy_method.calls == [("plan", "wide", {}, 18), ("search", "wide", 18, 6)]
    assert res.meta["config"]["dim"] == 3 and res.meta["preset"]["summary"] == "wide: dim 3"
    assert "search_seconds" in res.meta["preset"]
    toy_method.calls.clear()  # the same command again: the finished run, its search not repeated
    assert run_align(wide, progress=False).meta == res.meta and toy_method.calls == []


def test_a_methods_presets_through_the_command_line(tmp_path, world_features, toy_method, capsys):
    base = ["align", "--shards", shards(world_features), "--method", toy_method.name, "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "w"), "--preset", "wide"]) == 0
    assert "; preset wide: dim 3 (toy)" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "x"), "--preset", "paper"]) == 2
    err = one_line_error(capsys)
    assert f"--preset 'paper': unknown for method {toy_method.name}; choose one of quick, wide" in err


# -- run dirs written before the rename --------------------------------------------------------------------------------
def test_a_finished_run_of_the_old_name_is_reused(tmp_path, world_features):
    out = tmp_path / "r"
    args = ["align", "--shards", shards(world_features), "--out", str(out), "--preset", "paper", *QUICK]
    assert main(args) == 0
    meta = json.loads((out / "run.json").read_text())
    old = {("recipe" if k == "preset" else k): v for k, v in meta.items()}
    for part in ("request", "align"):
        old[part] = {("recipe" if k == "preset" else k): v for k, v in meta[part].items()}
    text = json.dumps(old, indent=2)
    (out / "run.json").write_text(text)
    weights = (out / "anchors.safetensors").read_bytes()
    assert main(args) == 0  # reused: neither refused as another run nor trained again
    assert (out / "run.json").read_text() == text and (out / "anchors.safetensors").read_bytes() == weights
    # with other options it is another run, refused as before
    assert main([*args[:-1], "--anchors", "4", "--no-progress"]) == 2


# -- recipe files: [train] preset ------------------------------------------------------------------------------------
def test_recipe_train_preset_goes_to_the_methods_that_have_presets(tmp_path):
    r = load_recipe("pal-paper", data=tmp_path, sets=["train.preset=small"])
    assert r.train.preset == "small"
    presets = {m.method: m.preset for m in r.methods}
    assert presets["pal"] == "small" and all(p is None for m, p in presets.items() if m != "pal"), presets
    assert {m.method: m.preset for m in load_recipe("pal-paper", data=tmp_path, sets=["train.recipe=paper"]).methods}[
        "pal"
    ] == "paper"
    assert all(m.preset is None for m in load_recipe("pal-paper", data=tmp_path).methods)  # auto, as before


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["train.preset=fast"], "train.preset: unknown for method pal; choose one of auto, paper, small"),
        (["train.preset=paper", "train.recipe=small"], "train.recipe: is the old name of train.preset; give one"),
    ],
)
def test_recipe_train_preset_is_checked(tmp_path, sets, expected):
    from pipe_align.extract.errors import PipeError

    with pytest.raises(PipeError) as e:
        load_recipe("pal-paper", data=tmp_path, sets=sets)
    assert expected in str(e.value) and "\n" not in str(e.value)
