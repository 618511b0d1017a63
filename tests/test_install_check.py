"""The root conftest stops a test run at once when `pipe_align` is missing or is another checkout's code."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def root_conftest():
    spec = importlib.util.spec_from_file_location("pipe_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_this_checkout_passes():
    assert root_conftest().install_problem(ROOT) is None


def test_another_checkout_is_named_with_the_fix(tmp_path):
    problem = root_conftest().install_problem(tmp_path)
    assert f"imported from {ROOT / 'extract'}, another checkout, not {tmp_path / 'extract'}" in problem
    assert f"run `make install` in {tmp_path}" in problem


def test_missing_package_is_named_with_the_fix(tmp_path, monkeypatch):
    module = root_conftest()

    def missing(name, package=None):
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

    monkeypatch.setattr(module.importlib.util, "find_spec", missing)
    assert module.install_problem(tmp_path).startswith("pipe_align is not installed in this Python; run `make install`")


def test_a_second_clone_stops_before_any_test(tmp_path):
    """A second clone tested with this environment: the run stops at once, exit code 4, no test runs."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "conftest.py", clone / "conftest.py")
    (clone / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntestpaths = ['tests']\n")
    (clone / "tests" / "test_one.py").write_text("def test_one():\n    pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4
    assert "another checkout" in done.stdout + done.stderr and "make install" in done.stdout + done.stderr
    assert "passed" not in done.stdout
