"""Two processes creating one store: the store's claim (extract/claim.py) lets exactly one create and write it; the
other refuses in one line naming the first, or finds it complete. A claim left by a killed process is taken over.

The processes are real (multiprocessing, spawn): two long-lived workers each run `pipe extract` of the same new store,
released at the moment the runner has planned the job (just before it creates the store), 0.05-0.2 s apart.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from pipe_align.extract.claim import claim, claim_path
from pipe_align.extract.errors import PipeError
from pipe_align.extract.store import StoreLayout, create_store, open_store

SPAWN = mp.get_context("spawn")


# ------------------------------------------------------------------------------------------------- the workers


HOLD_S = 1.0  # a worker's extraction is made this much longer (the tiny one takes a fraction of a second)


def _extract_worker(tasks, results) -> None:
    """Runs `pipe extract` tasks: (key, argv, release_at). The runner's plan step is wrapped to wait until
    `release_at`, so that two workers reach store creation at the chosen times whatever their start-up took, and its
    store work to last HOLD_S longer, so that the second arrives while the first is at work."""
    import pipe_align.extract.runner as runner
    from pipe_align.pipelines.cli import main

    planned, run = runner.plan, runner._run
    at = {"release": 0.0, "arrived": 0.0}

    def plan_then_wait(cfg):
        job = planned(cfg)
        time.sleep(max(0.0, at["release"] - time.time()))
        at["arrived"] = time.time()
        return job

    def run_then_hold(*args, **kwargs):
        out = run(*args, **kwargs)
        time.sleep(HOLD_S)
        return out

    runner.plan, runner._run = plan_then_wait, run_then_hold
    results.put(("ready", os.getpid()))
    while (task := tasks.get()) is not None:
        key, argv, at["release"] = task
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        results.put((key, os.getpid(), code, err.getvalue().strip(), at["arrived"], time.time()))


def _hold_claim(store: str, held, stop) -> None:
    with claim(Path(store)):
        held.set()
        stop.wait(30)


def _die_holding_claim(store: str) -> None:
    with claim(Path(store)):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------- the tests


def test_two_extracts_of_one_new_store_never_interleave(tmp_path, tiny_dinov2):
    """Repeated with the second process 0.05-0.2 s behind the first. Before the claim, the second removed the first's
    `.creating` folder (the store was left without `done` rows and every rerun failed) or hit ContainsArrayError."""
    tasks, results = [SPAWN.Queue(), SPAWN.Queue()], SPAWN.Queue()
    workers = [SPAWN.Process(target=_extract_worker, args=(q, results), daemon=True) for q in tasks]
    for w in workers:
        w.start()
    try:
        assert sorted(results.get(timeout=120)[0] for _ in workers) == ["ready", "ready"]
        for rep, delay in enumerate((0.05, 0.1, 0.2)):
            features = tmp_path / f"f{rep}"
            argv = [
                "extract",
                "--encoder",
                f"hf:{tiny_dinov2}",
                "--dataset",
                "world",
                "-o",
                "size=12",
                "--shard-rows",
                "4",
                "--features",
                str(features),
                "--device",
                "cpu",
                "--no-progress",
            ]
            start = time.time() + 2.0  # both workers have planned by then (a tiny model, 12 world images)
            tasks[0].put(((rep, 0), argv, start))
            tasks[1].put(((rep, 1), argv, start + delay))
            # (pid, exit code, stderr, arrived at store creation, finished), the first to arrive first
            first, second = sorted((results.get(timeout=120)[1:] for _ in workers), key=lambda r: r[3])
            assert first[1] == 0, first[2]
            if second[3] < first[4] - 0.1:  # it came while the first held the store: refused, naming it
                assert second[1] == 2 and "\n" not in second[2], second[2]
                assert f"being created by PID {first[0]} on host {socket.gethostname()}" in second[2], second[2]
            else:  # it came after the first had finished (a very late start): complete, nothing to do
                assert second[1] == 0, second[2]
            store = next(features.rglob("*.zarr"))
            assert open_store(store).verify() == []
            left = sorted(p.name for p in store.parent.iterdir())
            assert left == [store.name], left  # no `.creating`, no `.claim` left behind
    finally:
        for q in tasks:
            q.put(None)
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()


def layout(count: int = 8) -> StoreLayout:
    enc = {
        "alias": "t",
        "model_id": "t",
        "revision": None,
        "dim": 4,
        "layer": "last",
        "image_size": 28,
        "patch_size": 14,
        "num_register_tokens": 0,
    }
    return StoreLayout(
        modality="image",
        encoder=enc,
        dataset="world",
        split="val",
        count=count,
        tokens=4,
        dim=4,
        rows_per_chunk=4,
        rows_per_shard=4,
        grid=(2, 2),
    )


def fill(store) -> None:
    for s in range(store.layout.num_shards):
        a, b = store.layout.shard_range(s)
        rows = {
            "ids": np.array([f"i{r}" for r in range(a, b)]),
            "cls": np.ones((b - a, 4), np.float16),
            "patches": np.ones((b - a, 4, 4), np.float16),
            "labels": np.zeros(b - a, np.int32),
        }
        store.write_shard(s, rows, np.zeros(b - a, bool))
    store.finalize()


def test_a_live_claim_refuses_in_one_line_naming_pid_and_host(tmp_path):
    path = tmp_path / "f" / "world" / "val" / "t.zarr"
    held, stop = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_claim, args=(str(path), held, stop))
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(PipeError) as info:
            create_store(path, layout())
        msg = str(info.value)
        assert msg.startswith(f"{path}: being created by PID {holder.pid} on host {socket.gethostname()} (since ")
        assert "\n" not in msg and not path.exists()
    finally:
        stop.set()
        holder.join(30)
    fill(create_store(path, layout()))  # released: the next run creates it
    assert open_store(path).verify() == [] and not claim_path(path).exists()


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "f" / "world" / "val" / "t.zarr"
    dead = SPAWN.Process(target=_die_holding_claim, args=(str(path),))
    dead.start()
    dead.join(60)
    assert dead.exitcode == -signal.SIGKILL
    assert str(dead.pid) in claim_path(path).read_text()  # the claim file names a process that no longer exists
    path.with_name(path.name + ".creating").mkdir()  # and it died half-way through creating the store
    (path.with_name(path.name + ".creating") / "junk").write_text("x")
    fill(create_store(path, layout()))
    assert open_store(path).verify() == []
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_claims_nest_in_one_process_and_a_planted_link_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    with claim(path):
        fill(create_store(path, layout()))  # create_store takes the claim the caller already holds
        assert claim_path(path).exists()
    assert not claim_path(path).exists()
    other = tmp_path / "o.zarr"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    claim_path(other).symlink_to(victim)
    with pytest.raises(PipeError, match="cannot create the store's claim file"):
        create_store(other, layout())
    assert victim.read_text() == "keep"


def test_a_link_planted_at_the_creating_name_is_not_created_through(tmp_path):
    """`<store>.creating` planted as a link to a folder outside: the store is created in a fresh folder of its own and
    nothing is written into the link's target."""
    victim = tmp_path / "victim"
    victim.mkdir()
    path = tmp_path / "features" / "world" / "val" / "enc.zarr"
    path.parent.mkdir(parents=True)
    path.with_name(path.name + ".creating").symlink_to(victim, target_is_directory=True)
    create_store(path, layout())
    assert list(victim.iterdir()) == []
    assert path.is_dir() and not path.is_symlink() and (path / "zarr.json").exists()
