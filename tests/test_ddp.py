"""Data parallelism (torchrun, gloo on CPU): N ranks train what one process trains on the same batches, every method."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipe_align.align.data import part_bounds
from pipe_align.pipelines.cli import main

FAST = ["--anchors", "16", "--batch-size", "7", "--epochs", "3", "--val-fraction", "0.25", "--lr", "0.05",
        "--warmup-epochs", "0.5", "--device", "cpu", "--no-progress"]  # fmt: skip


def test_part_bounds_cover_the_batch_in_rank_order():
    for n in (2, 7, 8, 13):
        for world in (1, 2, 3, 4):
            parts = [part_bounds(n, (r, world)) for r in range(world)]
            sizes = parts[0][2]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert [p[0] for p in parts] == list(np.cumsum((0, *sizes[:-1])))
            assert all(hi - lo == s for (lo, hi, _), s in zip(parts, sizes))
    assert part_bounds(5, None) == (0, 5, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "pipe_align.pipelines.cli", "align",
           *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


RUNS = {  # method -> flags; small settings so that a run takes seconds, and rates that move the parameters
    "pal": ["--anchors", "16", "--lr", "0.05", "--warmup-epochs", "0.5"],
    "linear": ["--dim", "16", "--lr", "0.05", "--structure-weight", "10", "--structure-warmup-steps", "2",
               "--lr-finder", "0"],
    "mlp": ["--dim", "16", "--hidden", "16", "--lr", "0.05"],
    "sotalign": ["--lr", "0.05"],
    "procrustes": [],
}
COMMON = ["--batch-size", "7", "--epochs", "3", "--val-fraction", "0.25", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("method,mode", [("pal", "memory"), ("pal", "stream"), ("linear", "memory"),
                                         ("mlp", "stream"), ("sotalign", "memory"), ("procrustes", "memory")])
def test_two_ranks_train_what_one_process_trains(tmp_path, world_features, method, mode):
    """Same weights (to float tolerance) and the same per-epoch losses: the gathered rows and summed gradients make
    every rank's step the single-process step, for every method of the one training loop."""
    shards = str(world_features / "world" / "train")
    extra = ["--memory-budget", "0"] if mode == "stream" else []
    args = ["--method", method, *RUNS[method], *COMMON, *extra]
    torch.set_num_threads(1)
    assert main(["align", "--shards", shards, "--out", str(tmp_path / "one"), *args]) == 0
    proc = _torchrun(2, ["--shards", shards, "--out", str(tmp_path / "two"), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / r / "run.json").read_text()) for r in ("one", "two"))
    assert two["data_parallel"] == 2 and one["data_parallel"] == 1 and two["data_mode"] == mode
    assert two["complete"] and not (tmp_path / "two" / "checkpoint.pt").exists()
    weights = "anchors.safetensors" if method == "pal" else "weights.safetensors"
    w1, w2 = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert w1.keys() == w2.keys()
    for k in w1:  # summation order differs across ranks; Adam's g / sqrt(v) amplifies that noise on tiny gradients
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=0), (k, (w1[k] - w2[k]).abs().max())
    assert len(one["history"]) == len(two["history"]) == (0 if method == "procrustes" else 3)
    for h1, h2 in zip(one["history"], two["history"]):  # float32 losses of several nats (SOTAlign's KLOT: 1/eps)
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5, rel=1e-5)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-5, rel=1e-5)
    if method != "procrustes":  # trained: the equality above is about parameters that moved
        first = one["history"][0]["train_loss"]
        assert any(abs(h["train_loss"] - first) > 1e-3 for h in one["history"][1:])
