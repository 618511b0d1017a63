"""The one registry mechanism (extract/registry.py): its rules, the explicit import lists that fill the four
registries (methods, eval tasks, datasets, encoders), and the help texts that list their names."""

from __future__ import annotations

import compileall
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from pipe_align.extract.errors import PipeError
from pipe_align.extract.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


class Widget:
    pass


class Gadget:
    pass


# -- the Registry class ---------------------------------------------------------------------------------------------


def test_register_as_decorator_and_as_plain_call():
    reg = Registry("widget")

    @reg.register("b")
    class B:
        pass

    assert reg.register("a", Widget) is Widget  # a plain call returns the object, as the decorator does
    assert reg.get("a") is Widget and reg.get("b") is B


def test_names_are_sorted_and_items_contains_follow_them():
    reg = Registry("widget")
    for name, obj in (("zeta", Widget), ("alpha", Gadget), ("mid", int)):
        reg.register(name, obj)
    assert reg.names() == ["alpha", "mid", "zeta"]
    assert reg.items() == [("alpha", Gadget), ("mid", int), ("zeta", Widget)]
    assert reg.values() == [Gadget, int, Widget]
    assert "mid" in reg and "nope" not in reg and None not in reg


def test_unknown_name_is_a_pipe_error_listing_every_valid_name():
    reg = Registry("widget")
    reg.register("b", Widget, aliases=("bee",))
    reg.register("a", Gadget)
    with pytest.raises(PipeError) as e:
        reg.get("x")
    assert str(e.value) == "unknown widget 'x'; valid: a, b, bee"
    hinted = Registry("encoder", hint="or hf:<model id or path>")
    hinted.register("minilm", Widget)
    with pytest.raises(PipeError) as e:
        hinted.get("nope")
    assert str(e.value) == "unknown encoder 'nope'; valid: minilm, or hf:<model id or path>"


def test_aliases_reach_the_same_object_and_are_listed_on_request():
    reg = Registry("widget")
    reg.register("pal", Widget, aliases=("projection-free", "anchors"))
    assert reg.get("anchors") is reg.get("projection-free") is reg.get("pal") is Widget
    assert "anchors" in reg and reg.canonical("anchors") == "pal"
    assert reg.names() == ["pal"] and reg.items() == [("pal", Widget)]  # one entry, not three
    assert reg.names(aliases=True) == ["anchors", "pal", "projection-free"]


def test_a_second_registration_of_a_name_or_alias_is_refused():
    reg = Registry("widget")
    reg.register("a", Widget, aliases=("alpha",))
    with pytest.raises(ValueError, match=r"^widget 'a' is already registered \(by tests\.test_registry\.Widget\)$"):
        reg.register("a", Gadget)
    with pytest.raises(ValueError, match=r"^widget 'alpha' \(an alias of 'a'\) is already registered"):
        reg.register("b", Gadget, aliases=("alpha",))
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("c", Gadget, aliases=("a",))  # an alias may not take a name either
    assert reg.names(aliases=True) == ["a", "alpha"] and reg.get("alpha") is Widget  # nothing half-registered
    with pytest.raises(ValueError, match="given twice"):
        reg.register("d", Gadget, aliases=("d",))
    for bad in ("", " e", 3):
        with pytest.raises(ValueError, match="non-empty string"):
            reg.register(bad, Gadget)
    assert reg.names() == ["a"]


def test_registering_the_same_object_again_changes_nothing():
    reg = Registry("widget")
    reg.register("a", Widget, aliases=("alpha",))
    assert reg.register("a", Widget, aliases=("alpha",)) is Widget
    assert reg.items() == [("a", Widget)] and reg.names(aliases=True) == ["a", "alpha"]


def test_a_reloaded_module_replaces_its_own_definitions(tmp_path, monkeypatch):
    """importlib.reload re-runs the decorators with new class objects of the same module and name: not a clash."""
    (tmp_path / "reg_holder.py").write_text("from pipe_align.extract.registry import Registry\nREG = Registry('w')\n")
    (tmp_path / "reg_user.py").write_text("from reg_holder import REG\n\n\n@REG.register('w1')\nclass W:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("reg_holder", "reg_user"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    user = importlib.import_module("reg_user")
    holder = sys.modules["reg_holder"]
    first = user.W
    user = importlib.reload(user)
    assert user.W is not first and holder.REG.get("w1") is user.W
    with pytest.raises(ValueError, match=r"already registered \(by reg_user\.W\)"):
        holder.REG.register("w1", type("W", (), {}))  # another module's class of the same name still clashes


def test_name_attr_and_unregister():
    reg = Registry("widget", name_attr="name")
    cls = reg.register("w", type("W", (), {}), aliases=("dub",))
    assert cls.name == "w"  # the canonical name, also when reached through an alias
    assert reg.unregister("dub") is cls and "w" not in reg and "dub" not in reg
    reg.register("w", Widget)  # the name is free again
    assert reg.get("w") is Widget


# -- the four registries, filled by explicit import lists ----------------------------------------------------------

LISTS = {  # module whose import list fills the registry -> (registry module, registry name)
    "pipe_align.align.methods": ("pipe_align.align.base", "METHODS"),
    "pipe_align.evaluate.tasks": ("pipe_align.evaluate.base", "TASKS"),
    "pipe_align.extract.datasets": ("pipe_align.extract.datasets.base", "DATASETS"),
    "pipe_align.extract.encoders": ("pipe_align.extract.encoders.registry", "ENCODERS"),
}
PACKAGES = ("pipe_align.align", "pipe_align.evaluate", "pipe_align.extract.datasets", "pipe_align.extract.encoders")

# Run in a fresh interpreter (a test process has imported much more): the registries after importing the four list
# modules, the files of our package that `cli_spec.build()` loads, then the registries after importing every module
# of each package.
# Run in a fresh interpreter (a test process has imported much more): the files of our package that
# `cli_spec.build()` loads (when asked), the registries after importing the four list modules, then the registries
# after importing every module of each package.
PROBE = """
import importlib, json, pkgutil, sys
LISTS = json.loads(sys.argv[1])
packages = json.loads(sys.argv[2])
out = {}
if len(sys.argv) > 3:
    from pipe_align.pipelines import cli_spec
    before = set(sys.modules)
    cli_spec.build()
    out["loaded"] = sorted(m.__file__ for n, m in list(sys.modules.items())
                           if n.startswith("pipe_align.") and n not in before and getattr(m, "__file__", None))
for module in LISTS:
    importlib.import_module(module)
def names():
    return {m: getattr(importlib.import_module(r), n).names(aliases=True) for m, (r, n) in LISTS.items()}
out["listed"] = names()
if len(sys.argv) > 3:
    for package in packages:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{info.name}")
    out["everything"] = names()
print(json.dumps(out))
"""


def probe(*extra: str, path: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-c", PROBE, json.dumps(LISTS), json.dumps(PACKAGES), *extra]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=path or ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def here() -> dict[str, list[str]]:
    return {m: getattr(importlib.import_module(r), n).names(aliases=True) for m, (r, n) in LISTS.items()}


def test_every_registering_module_is_in_its_import_list_and_the_spec_key_covers_what_it_reads():
    """Importing every module of align/, evaluate/, extract/datasets/ and extract/encoders/ registers nothing that
    the import lists did not; and every file of the package that `cli_spec.build()` reads is in the cache key."""
    from pipe_align.pipelines import cli_spec

    for module in LISTS:
        importlib.import_module(module)
    got = probe("build")
    assert got["everything"] == got["listed"] == here()
    assert all(got["listed"].values())
    keyed = {str(p) for p in cli_spec.sources()}
    assert len(got["loaded"]) > 20 and set(got["loaded"]) - keyed == set()


def test_registries_do_not_depend_on_source_files(tmp_path):
    """An install of compiled modules only (no .py files to read) registers exactly the same names."""
    for folder in ("align", "evaluate", "extract", "pipelines"):
        shutil.copytree(ROOT / folder, tmp_path / "pipe_align" / folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(tmp_path / "pipe_align", quiet=1, legacy=True)
    for py in (tmp_path / "pipe_align").rglob("*.py"):
        py.unlink()
    got = probe(path=str(tmp_path))
    assert got["listed"] == here()


def test_register_method_as_a_plain_call_and_with_aliases():
    from pipe_align.align.base import METHODS, Aligner, register_method
    from pipe_align.align.methods import get_method, method_names

    cls = type("Plain", (Aligner,), {"__module__": __name__})
    try:
        assert register_method("plain-test", aliases=("plain-alias",))(cls) is cls
        assert get_method("plain-test") is cls and get_method("plain-alias") is cls and cls.name == "plain-test"
        assert "plain-test" in method_names()
    finally:
        METHODS.unregister("plain-test")
    assert "plain-test" not in METHODS and "plain-alias" not in METHODS
    with pytest.raises(PipeError, match=r"^unknown method 'plain-test'; valid: .*\bpal\b"):
        get_method("plain-test")


# -- help texts list the registries' names ---------------------------------------------------------------------------


def listed(help_text: str, before: str, after: str) -> list[str]:
    """The comma-separated names between `before` and `after` in a help text."""
    assert before in help_text, help_text
    return [n.strip() for n in help_text.split(before, 1)[1].split(after, 1)[0].split(",")]


def test_help_texts_list_exactly_the_registered_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPE_CACHE", str(tmp_path))
    from pipe_align.align.methods import METHODS
    from pipe_align.extract.datasets import DATASETS
    from pipe_align.extract.datasets.base import Dataset
    from pipe_align.extract.encoders.registry import ENCODERS
    from pipe_align.pipelines.cli import app

    commands = typer.main.get_command(app).commands
    help_of = {(c, p.name): p.help for c in ("extract", "align") for p in commands[c].params}
    help_of |= {(f"eval {n}", p.name): p.help for n, c in commands["eval"].commands.items() for p in c.params}
    help_of["encoders prepare", "alias"] = commands["encoders"].commands["prepare"].params[0].help
    datasets = DATASETS.names(aliases=True)
    assert sorted(listed(help_of["align", "method"], "Alignment method: ", ".")) == METHODS.names(aliases=True)
    assert listed(help_of["align", "method"], ": ", ".")[0] == "pal"  # the default first
    assert listed(help_of["extract", "dataset"], "(docs/datasets.md): ", ".") == datasets
    tasks = [c for c, _ in help_of if c.startswith("eval ")]
    assert tasks and all(listed(help_of[c, "dataset"], "stores: ", ".") == datasets for c in tasks)
    assert listed(help_of["extract", "encoder"], "alias (", ")") == ENCODERS.names(aliases=True)
    assert listed(help_of["encoders prepare", "alias"], "prepare: ", ".") == ENCODERS.names(aliases=True)
    claims_help = next(p.help for p in commands["claims"].params if p.name == "dataset")
    boxed = [n for n in datasets if DATASETS.get(n).has_boxes is not Dataset.has_boxes]  # readers that define boxes
    assert {"world", "flickr30k-entities"} <= set(boxed) < set(datasets)
    assert listed(claims_help, "phrase boxes: ", ".") == boxed


def test_a_recipe_naming_an_unknown_reader_lists_every_registered_one():
    from types import SimpleNamespace

    from pipe_align.extract.datasets import DATASETS
    from pipe_align.pipelines.recipe import check_datasets

    recipe = SimpleNamespace(path="r.toml", dataset=lambda name: SimpleNamespace(reader="nope", root=None))
    with pytest.raises(PipeError) as e:
        check_datasets(recipe, ["mine"])
    assert str(e.value).endswith(
        f"no dataset reader 'nope' in this pipe (leave it out with --skip mine); allowed: {', '.join(DATASETS.names())}"
    )
