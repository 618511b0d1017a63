"""Before any test: the `pipe_align` that Python imports must be this checkout's code.

An editable install points `pipe_align.*` at the folders of the checkout it was made in, so a second clone (or a
worktree) tested with the first one's environment would silently test the first clone's code. The run stops at once
instead, naming the command that fixes it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
PACKAGES = ("extract", "align", "evaluate", "pipelines")


def install_problem(root: Path = ROOT) -> str | None:
    """Why `pipe_align` as installed cannot test the checkout at `root`, or None when it can."""
    fix = f"run `make install` in {root} (it creates {root / '.venv'}) and test with {root / '.venv/bin/python'}"
    for name in PACKAGES:
        try:
            spec = importlib.util.find_spec(f"pipe_align.{name}")
        except ModuleNotFoundError:
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return f"pipe_align is not installed in this Python; {fix}"
        where = Path(next(iter(spec.submodule_search_locations))).resolve()
        if where != (root / name).resolve():
            return f"pipe_align.{name} is imported from {where}, another checkout, not {root / name}; {fix}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    problem = install_problem()
    if problem:
        pytest.exit(problem, returncode=4)
