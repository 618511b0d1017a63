"""Data-parallel PAL (torchrun, gloo on CPU): N ranks train the anchors one process trains on the same batches."""

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


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_two_ranks_train_the_single_process_anchors(tmp_path, world_features, mode):
    shards = str(world_features / "world" / "train")
    extra = ["--memory-budget", "0"] if mode == "stream" else []
    torch.set_num_threads(1)
    assert main(["align", "--shards", shards, "--out", str(tmp_path / "one"), *FAST, *extra]) == 0
    proc = _torchrun(2, ["--shards", shards, "--out", str(tmp_path / "two"), *FAST, *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / r / "run.json").read_text()) for r in ("one", "two"))
    assert two["data_parallel"] == 2 and one["data_parallel"] == 1 and two["data_mode"] == mode
    assert two["complete"] and not (tmp_path / "two" / "checkpoint.pt").exists()
    a1, a2 = load_file(tmp_path / "one" / "anchors.safetensors"), load_file(tmp_path / "two" / "anchors.safetensors")
    from pipe_align.align.pal import PAL, PALConfig

    init = PAL(PALConfig(anchors=16), a1["image_anchors"].shape[1], a1["text_anchors"].shape[1])
    assert (a1["image_anchors"] - init.image_anchors).abs().max() > 1e-2  # trained: equality below means something
    for k in a1:
        assert torch.allclose(a1[k], a2[k], atol=1e-5, rtol=0), (k, (a1[k] - a2[k]).abs().max())
    for h1, h2 in zip(one["history"], two["history"]):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-5)


def test_baselines_refuse_torchrun(tmp_path, world_features):
    proc = _torchrun(2, ["--shards", str(world_features / "world" / "train"), "--out", str(tmp_path / "p"),
                         "--method", "procrustes", "--no-progress"])  # fmt: skip
    assert proc.returncode != 0 and "data-parallel training (torchrun) is PAL's" in proc.stderr
