"""pipe's OpenMP thread policy (pipelines/threads.py): in effect for the CLI and the API, and the user's settings win.

What counts is what libgomp read when torch loaded it, not os.environ: each subprocess runs with OMP_DISPLAY_ENV=VERBOSE
and libgomp prints its settings. It prints OMP_WAIT_POLICY 'PASSIVE' also when the variable is unset, so the tests
read GOMP_SPINCOUNT: 0 under PASSIVE, 300000 by default (and a plain `import torch` is the control).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipe_align.extract.errors import PipeError
from pipe_align.pipelines import threads

PIPE = Path(sys.executable).parent / "pipe"  # the console script of [project.scripts]
PROBE = "import json, torch; print(json.dumps({'threads': torch.get_num_threads()}))"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_", threads.THREADS_ENV))}
    return env | {"OMP_DISPLAY_ENV": "VERBOSE"} | extra


def _libgomp(stderr: str) -> dict[str, str]:
    out = {}
    for line in stderr.splitlines():
        key, _, value = line.strip().partition(" = ")
        if key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
            out[key] = value.strip("'")
    assert "GOMP_SPINCOUNT" in out, stderr[-2000:]  # torch (and so libgomp) was loaded
    return out


def _python(code: str, **env: str) -> tuple[dict, dict[str, str]]:
    proc = subprocess.run([sys.executable, "-c", code], env=_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), _libgomp(proc.stderr)


@pytest.fixture(scope="module")
def torch_default() -> tuple[int, str]:
    """The control: torch imported on its own spins by default. Returns its (threads, spin count)."""
    out, omp = _python(PROBE)
    assert omp["GOMP_SPINCOUNT"] != "0"
    return out["threads"], omp["GOMP_SPINCOUNT"]


def test_cli_sets_passive_wait_before_torch(torch_default):
    assert PIPE.is_file(), "the venv has no `pipe` console script: run `make install`"
    proc = subprocess.run([str(PIPE), "encoders", "list"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "dinov2" in proc.stdout, proc.stderr[-2000:]
    omp = _libgomp(proc.stderr)
    assert omp["GOMP_SPINCOUNT"] == "0" and omp["OMP_WAIT_POLICY"] == "PASSIVE"
    assert omp["OMP_NUM_THREADS"] == str(torch_default[0])  # the thread count stays torch's default


def test_cli_user_settings_win(torch_default):
    n = torch_default[0] + 1
    env = _env(OMP_WAIT_POLICY="ACTIVE", PIPE_THREADS=str(n), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(PIPE), "encoders", "list"], env=env, capture_output=True, text=True, timeout=300)
    omp = _libgomp(proc.stderr)
    assert omp["OMP_WAIT_POLICY"] == "ACTIVE" and omp["GOMP_SPINCOUNT"] != "0"
    assert omp["OMP_NUM_THREADS"] == str(n)  # PIPE_THREADS wins over OMP_NUM_THREADS


def test_cli_rejects_a_bad_thread_count():
    env = _env(PIPE_THREADS="lots")
    proc = subprocess.run([str(PIPE), "encoders", "list"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: PIPE_THREADS='lots'")


def test_api_sets_passive_wait_before_torch(torch_default):
    out, omp = _python("from pipe_align.pipelines import load\n" + PROBE)
    assert omp["GOMP_SPINCOUNT"] == "0" and out["threads"] == torch_default[0]


def test_api_user_settings_win(torch_default):
    out, omp = _python("from pipe_align.pipelines import load\n" + PROBE, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1")
    assert omp["OMP_WAIT_POLICY"] == "ACTIVE" and omp["GOMP_SPINCOUNT"] != "0" and out["threads"] == 1
    # torch imported first: libgomp has read its settings already (spinning, as torch alone); a set_num_threads
    # call is not undone, and PIPE_THREADS still sets the count
    code = "import torch\ntorch.set_num_threads(1)\nfrom pipe_align.pipelines import load\n" + PROBE
    out, omp = _python(code)
    assert out["threads"] == 1 and omp["GOMP_SPINCOUNT"] == torch_default[1]


def test_pipe_threads_after_torch_sets_the_count(monkeypatch):
    """torch already loaded (it is, in this process): PIPE_THREADS goes through torch.set_num_threads."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    monkeypatch.setenv("PIPE_THREADS", "3")
    assert threads.configure() == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"} and calls == [3]
    monkeypatch.delenv("PIPE_THREADS")
    threads.configure()
    assert calls == [3]  # without PIPE_THREADS the count is left alone


def test_policy_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(threads, "_problem", [])
    assert threads.policy({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.policy({"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "3"}) == {}
    assert threads.policy({"PIPE_THREADS": "2", "OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "2"
    threads.check()
    env = {"PIPE_THREADS": "0"}
    assert threads.configure(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(PipeError, match="PIPE_THREADS='0'"):
        threads.check()


def test_api_load_reports_a_bad_thread_count(monkeypatch, tmp_path):
    from pipe_align.pipelines import api

    monkeypatch.setattr(threads, "_problem", [])
    threads.policy({"PIPE_THREADS": "-1"})
    with pytest.raises(PipeError, match="PIPE_THREADS"):
        api.load(tmp_path)
