"""The OpenMP thread policy of `pipe`, applied before torch loads its OpenMP runtime (docs/kernel.md, "Threads").

torch runs its CPU ops on libgomp. By default a libgomp thread that runs out of work spins (busy-waits) for a while
before it sleeps, so that the next parallel op starts at once. On a machine whose cores are also used by other
processes (a shared workstation, a CI runner, the project's 2-core machine) that spinning takes CPU time from the
threads that have work, and every op waits at its closing barrier for a thread that was preempted. Code made of many
small ops (the fused kernel's per-block steps, per-image evaluation) then ran several times slower than one thread.
`OMP_WAIT_POLICY=PASSIVE` makes idle threads sleep at once and removes that.

libgomp reads OMP_* once, when it is loaded (`import torch`); a value set after that changes nothing in this process
(only in child processes). So `configure` runs when `pipe_align.pipelines` is imported, which comes before torch in
every `pipe` command (the console script imports `pipe_align.pipelines.cli`) and in `from pipe_align.pipelines import
load` when that is the first import. Whatever the user set wins: an OMP_WAIT_POLICY or OMP_NUM_THREADS already in the
environment is kept, a `torch.set_num_threads` call is never undone, and PIPE_THREADS=N asks for N threads (it
overrides OMP_NUM_THREADS and also works after torch was imported). This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from pipe_align.extract.errors import PipeError  # no torch behind it

THREADS_ENV = "PIPE_THREADS"
"""Intra-op threads for `pipe` and the API (a positive integer); unset: torch's default (one per core)."""

WAIT_POLICY = "PASSIVE"

_problem: list[str] = []  # an unusable PIPE_THREADS value, reported by `check` (one-line error in the CLI and API)


def _threads(environ: MutableMapping[str, str]) -> int | None:
    raw = environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        _problem[:] = [f"{THREADS_ENV}={raw!r}: want a positive number of threads (or leave it unset)"]
        return None
    return int(raw)


def policy(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The OMP_* variables `configure` adds to `environ`: pipe's defaults where the user set nothing."""
    out = {} if "OMP_WAIT_POLICY" in environ else {"OMP_WAIT_POLICY": WAIT_POLICY}
    n = _threads(environ)
    if n is not None:
        out["OMP_NUM_THREADS"] = str(n)
    return out


def configure(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the policy into the environment (this process's libgomp when torch is not loaded yet, and every child
    process: dask workers, torchrun ranks). With torch already loaded the wait policy can no longer change here, but
    PIPE_THREADS still sets the thread count. Returns what was set."""
    environ = os.environ if environ is None else environ
    added = policy(environ)
    environ.update(added)
    if "OMP_NUM_THREADS" in added and "torch" in sys.modules and environ is os.environ:
        sys.modules["torch"].set_num_threads(int(added["OMP_NUM_THREADS"]))
    return added


def check() -> None:
    """Raise PipeError for an unusable PIPE_THREADS (the CLI turns it into `error: ...`, exit 2)."""
    if _problem:
        raise PipeError(_problem[0])
