"""One small configuration per registered method, and the registry's split into trained and closed-form methods.

Tests that must cover every method parametrize over `method_names()` (or `trained()` / `closed_form()`) and take the
method's options from `SMALL`, so a method registered tomorrow is covered by them without an edit to any test; the only
edit it needs is its entry here, and `test_contract.py::test_every_registered_method_has_a_small_config` fails until it
has one. Each configuration is small enough for the tiny world stores of `conftest.world_features` (18 training pairs
of 32-dim tokens) and moves the parameters of a trained method within three epochs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pipe_align.align.base import TrainedAligner
from pipe_align.align.methods import get_method, load_aligner, method_names
from pipe_align.pipelines.cli import main

SMALL: dict[str, dict[str, Any]] = {
    # PAL: K and the token set given, so the small-data recipe probes nothing; a given rate turns the LR finder off
    "pal": {"anchors": 8, "use_cls": False, "lr": 0.05, "lr_finder": 0},
    "pal-fixed": {"anchors": 8, "use_cls": False},
    "procrustes": {"dim": 8},
    "cca": {"rank": 8},
    "csa": {"rank": 8},
    "asif": {"k": 8},
    # the STRUCTURE regulariser on, after two steps: its warm-up is state that resume and data parallelism must carry
    "linear": {"dim": 8, "lr": 0.05, "lr_finder": 0, "structure_weight": 10.0, "structure_warmup_steps": 2},
    # an open gate: the residual's dropout is live, so its seeded draws must match across resume and ranks
    "mlp": {"dim": 8, "rank": 4, "gate_init": 0.5, "lr": 0.01, "lr_finder": 0},
    "sotalign": {"lr": 0.01},
}

# Run-wide flags of every contract run: batches of 7 split unevenly over two ranks (4 + 3), three epochs, a quarter of
# the 24 world images held out, no early stop (every run walks the same epochs), the CPU.
RUN_FLAGS = [
    "--batch-size",
    "7",
    "--epochs",
    "3",
    "--val-fraction",
    "0.25",
    "--patience",
    "0",
    "--device",
    "cpu",
    "--no-progress",
]

# The default run covers each mechanism with PAL and one baseline; every other method runs under `-m slow`.
FAST = ("pal", "linear")


# Methods whose data-parallel run is known to differ from one process (their contract test is a strict xfail).
DP_GAPS: dict[str, str] = {}  # method -> why two ranks do not train what one process trains (none known)


def trained() -> list[str]:
    return [m for m in method_names() if issubclass(get_method(m), TrainedAligner)]


def closed_form() -> list[str]:
    return [m for m in method_names() if not issubclass(get_method(m), TrainedAligner)]


def method_flags(method: str) -> list[str]:
    """`--method NAME -p KEY=VALUE ...` for the method's small configuration (values as JSON, as `-p` reads them)."""
    flags = ["--method", method]
    for key, value in sorted(SMALL[method].items()):
        flags += ["-p", f"{key}={json.dumps(value)}"]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "pipe_align.pipelines.cli",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def assert_two_ranks_equal_one(feats: Path, out: Path, method: str, *extra: str) -> tuple[dict, dict]:
    """Same weights (to float tolerance) and the same per-epoch losses from one process and from two ranks, on the
    same batches: the gathered rows and summed gradients make every rank's step the single-process step. Returns
    both run.json."""
    args = ["align", *method_flags(method), "--shards", str(feats / "world" / "train"), *RUN_FLAGS, *extra]
    assert main([*args, "--out", str(out / "one")]) == 0
    proc = torchrun(2, [*args, "--out", str(out / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((out / r / "run.json").read_text()) for r in ("one", "two"))
    assert (one["data_parallel"], two["data_parallel"]) == (1, 2) and two["complete"]
    assert not (out / "two" / "checkpoint.pt").exists()
    w1, w2 = load_aligner(out / "one").state_dict(), load_aligner(out / "two").state_dict()
    assert w1.keys() == w2.keys()
    for k in w1:  # summation order differs across ranks; Adam's g / sqrt(v) amplifies that noise on tiny gradients
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=0), (k, (w1[k] - w2[k]).abs().max())
    trains = issubclass(get_method(method), TrainedAligner)
    assert len(one["history"]) == len(two["history"]) == (3 if trains else 0)
    for h1, h2 in zip(one["history"], two["history"]):  # float32 losses of several nats (SOTAlign's KLOT: 1/eps)
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5, rel=1e-5)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-5, rel=1e-5)
    if trains:  # the equality above is about parameters that moved
        first = one["history"][0]["train_loss"]
        assert any(abs(h["train_loss"] - first) > 1e-3 for h in one["history"][1:])
    return one, two
