"""The layering contract of DESIGN.md, read from the source with `ast` (nothing is imported), and the packaging.

Every .py under extract/ align/ evaluate/ pipelines/ is the module `pipe_align.<path>`. Every import statement counts,
at module level or inside a function: a function-level import that only hides a cycle is still a cycle.
`from pkg import name` points at the submodule `pkg.name` when there is one, else at `pkg/__init__.py`; a package
__init__ that imports its submodules (to fill a registry) has ordinary edges to them.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "pipe_align"
LAYERS = {"extract": 0, "align": 1, "evaluate": 2, "pipelines": 3}  # imports point down this list only
CHECKED = (*LAYERS, "tests", "bench")  # folders where no import may name a bare top-level folder


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (one of ours)
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join((NAMESPACE, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def source_files(folders) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


MODULES: dict[str, Path] = {module_name(p): p for p in source_files(LAYERS)}


def rel(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(absolute module, names imported from it ([] for `import x`), line) for every import statement."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def resolve(name: str) -> str | None:
    """Our module for a dotted name: itself, else its longest known prefix (`import a.b.c` binds a.b.c's package)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def edges() -> list[Edge]:
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, names, line in imported_names(tree, module, path.name == "__init__.py"):
            if base != NAMESPACE and not base.startswith(NAMESPACE + "."):
                continue
            targets = [f"{base}.{n}" if f"{base}.{n}" in MODULES else base for n in names] or [base]
            for target in {resolve(t) for t in targets} - {None, module}:
                found.append(Edge(module, target, line))
    return found


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def one_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import cycle through `start` inside its component (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")


def cycles_of(component: list[str], graph: dict[str, set[str]], limit: int = 8) -> list[list[str]]:
    """The distinct shortest cycles through each member, shortest first: what to cut, even in a large component."""
    found = {}
    for start in component:
        cycle = one_cycle(start, set(component), graph)
        first = cycle.index(min(cycle[:-1]))  # one rotation per cycle
        found.setdefault(tuple(cycle[first:-1] + cycle[:first]), None)
    return [[*c, c[0]] for c in sorted(found, key=lambda c: (len(c), c))][:limit]


def test_no_bare_folder_imports() -> None:
    """`import evaluate` would find Hugging Face's package (or ours only when run from the repo root)."""
    bad = []
    for path in source_files(CHECKED):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in LAYERS]
    assert not bad, "import through pipe_align.<folder>, never the bare folder:\n" + "\n".join(bad)


def test_imports_point_down_the_layers() -> None:
    up = [f"{rel(e.source)}:{e.line} imports {rel(e.target)}" for e in edges() if layer(e.target) > layer(e.source)]
    assert not up, "imports must point down extract < align < evaluate < pipelines:\n" + "\n".join(sorted(up))


FLOOR_ZERO = {f"{NAMESPACE}.extract.{m}" for m in ("errors", "files", "registry", "runtime")}


def test_floor_zero_imports_only_floor_zero_and_no_torch_at_module_level() -> None:
    """The bottom modules every stage may use (PipeError, atomic writes, the Registry, device and prefetch) import
    none of ours above them, and nothing heavy when imported: torch only inside a function."""
    assert FLOOR_ZERO <= set(MODULES), sorted(FLOOR_ZERO - set(MODULES))
    up = [
        f"{rel(e.source)}:{e.line} imports {rel(e.target)}"
        for e in edges()
        if e.source in FLOOR_ZERO and e.target not in FLOOR_ZERO
    ]
    assert not up, "floor 0 imports only floor 0:\n" + "\n".join(up)
    for module in sorted(FLOOR_ZERO):
        tree = ast.parse(MODULES[module].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("torch", "zarr", "numpy", "transformers")], (module, names)


def test_stages_take_device_and_prefetch_from_floor_zero() -> None:
    """No stage reaches into the extraction planner (job) or the shard writer (shards) for the device rule or the
    prefetcher; they live in extract/runtime.py."""
    bad = []
    for path in source_files(LAYERS):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and any(a.name in ("resolve_device", "prefetch") for a in node.names):
                if not (node.module or "").endswith("runtime"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lines: dict[tuple[str, str], int] = {}
    for e in edges():
        graph[e.source].add(e.target)
        lines.setdefault((e.source, e.target), e.line)
    report = []
    for component in strongly_connected(graph):
        report.append(f"{len(component)} files: {', '.join(rel(m) for m in component)}")
        for cycle in cycles_of(component, graph):
            steps = " -> ".join(f"{rel(a)}:{lines[a, b]}" for a, b in zip(cycle, cycle[1:]))
            report.append(f"    {steps} -> {rel(cycle[-1])}")
    assert not report, "import cycles between files (file:line of each import):\n" + "\n".join(report)


def test_cycle_finder_finds_a_planted_cycle() -> None:
    """The checker itself: a planted three-file cycle beside an acyclic part is reported, with its path."""
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"d"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert cycles_of(["a", "b", "c"], graph) == [["a", "b", "c", "a"]]
    two = {"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}  # a<->b and a->c->d->a: both reported, shortest first
    assert cycles_of(strongly_connected(two)[0], two) == [["a", "b", "a"], ["a", "c", "d", "a"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_edges_resolve_relative_submodule_and_package_imports(tmp_path, monkeypatch) -> None:
    """`from . import x`, `from pkg import submodule`, `from pkg import name` and function-level imports all count."""
    files = {
        "extract/__init__.py": "",
        "extract/low.py": "",
        "extract/pkg/__init__.py": "from pipe_align.extract.pkg import fam  # fills a registry\nTHING = 1\n",
        "extract/pkg/fam.py": "from pipe_align.extract.pkg.reg import register\n",
        "extract/pkg/reg.py": "def f():\n    from .. import low\n    from pipe_align.extract.pkg import THING\n",
        "align/__init__.py": "",
        "align/user.py": "import pipe_align.extract.pkg.reg\nfrom ..extract.pkg import fam, THING\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {module_name(p): p for p in source_files(LAYERS)})
    got = {(e.source.removeprefix("pipe_align."), e.target.removeprefix("pipe_align.")) for e in edges()}
    assert got == {
        ("extract.pkg", "extract.pkg.fam"),
        ("extract.pkg.fam", "extract.pkg.reg"),
        ("extract.pkg.reg", "extract.low"),
        ("extract.pkg.reg", "extract.pkg"),  # the registry importing its package back: a cycle through fam
        ("align.user", "extract.pkg.reg"),
        ("align.user", "extract.pkg.fam"),
        ("align.user", "extract.pkg"),
    }


def test_pyproject_lists_every_package() -> None:
    """setuptools installs only the listed packages: a folder missing from the list would be left out of a wheel."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {module_name(p) for p in source_files(LAYERS) if p.name == "__init__.py"}
    assert listed == folders, (
        f"pyproject.toml [tool.setuptools] packages: missing {sorted(folders - listed)}, "
        f"not a package folder {sorted(listed - folders)}"
    )
    orphans = [str(p.relative_to(ROOT)) for p in source_files(LAYERS) if not (p.parent / "__init__.py").is_file()]
    assert not orphans, f"modules outside any package (no __init__.py beside them): {orphans}"
    assert setuptools["package-dir"] == {f"{NAMESPACE}.{f}": f for f in LAYERS}


PROBE = """
import ast, importlib.metadata, importlib.util, json, pathlib, sys
out = {"hf": importlib.util.find_spec("evaluate") is not None}
if out["hf"]:
    import evaluate
    import pipe_align.evaluate
    import pipe_align.pipelines.cli  # the CLI imports our evaluate package in the same process as HF's
    out |= {"hf_file": evaluate.__file__, "hf_load": callable(getattr(evaluate, "load", None)),
            "ours": pipe_align.evaluate.__file__, "cli": "pipe_align.pipelines.cli" in sys.modules}
out["bare"] = {n: getattr(importlib.util.find_spec(n), "origin", None) for n in ("extract", "align", "pipelines")}
dist = importlib.metadata.distribution("pipe-align")
out["top_level"] = (dist.read_text("top_level.txt") or "").split()
out["files"] = [str(f) for f in dist.files or []]
out["mapping"] = []  # the editable finder's MAPPING keys: {"pipe_align.extract": "<repo>/extract", ...}
for f in dist.files or []:
    if f.name.startswith("__editable__") and f.suffix == ".py":
        for node in ast.walk(ast.parse(pathlib.Path(dist.locate_file(f)).read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and "MAPPING" in ast.unparse(node).split("=")[0]:
                out["mapping"] += list(ast.literal_eval(node.value))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """What a process outside the repo sees (cwd elsewhere, no PYTHONPATH): the repo root is not on sys.path,
    so neither our folders nor the build's pipe_align.egg-info there can stand in for the installed distribution."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path_factory.mktemp("elsewhere"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hugging_face_evaluate_and_ours_coexist(installed) -> None:
    """`import evaluate` is Hugging Face's and ours is `pipe_align.evaluate`; both load in one process, and the CLI
    still imports."""
    if not installed["hf"]:
        pytest.skip("Hugging Face's evaluate is not installed (pip install -e '.[dev]')")
    hf, ours = Path(installed["hf_file"]), Path(installed["ours"])
    assert "site-packages" in hf.parts and not hf.is_relative_to(ROOT / "evaluate") and installed["hf_load"], hf
    assert ours == ROOT / "evaluate" / "__init__.py" or ours.parts[-3:] == (NAMESPACE, "evaluate", "__init__.py"), ours
    assert installed["cli"]


def test_distribution_installs_only_the_namespace(installed) -> None:
    """The installed pipe-align (wheel or editable) provides `pipe_align` and no bare folder name at top level."""
    for name, origin in installed["bare"].items():  # whatever else may provide these names, it is not our tree
        assert origin is None or not Path(origin).is_relative_to(ROOT / name), f"`import {name}` finds {origin}"
    assert installed["top_level"] in ([], [NAMESPACE]), f"top_level.txt: {installed['top_level']}"
    bare = [f for f in installed["files"] if Path(f).parts[0] in LAYERS]
    assert not bare, f"pipe-align installs top-level files: {bare[:5]}"
    assert all(k.startswith(NAMESPACE + ".") for k in installed["mapping"]), installed["mapping"]
