"""Data parallelism (torchrun, gloo on CPU): how a batch is split over ranks, and the streamed data mode under two
ranks. Every method's two-rank run against one process is in tests/test_contract.py."""

import numpy as np

from pipe_align.align.data import part_bounds
from tests.contract import assert_two_ranks_equal_one


def test_part_bounds_cover_the_batch_in_rank_order():
    for n in (2, 7, 8, 13):
        for world in (1, 2, 3, 4):
            parts = [part_bounds(n, (r, world)) for r in range(world)]
            sizes = parts[0][2]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert [p[0] for p in parts] == list(np.cumsum((0, *sizes[:-1])))
            assert all(hi - lo == s for (lo, hi, _), s in zip(parts, sizes))
    assert part_bounds(5, None) == (0, 5, None)


def test_two_ranks_streaming_from_zarr_train_what_one_process_trains(tmp_path, world_features, one_thread):
    """The streamed data mode (`--memory-budget 0`: blocks read from Zarr per batch) under two ranks; the in-memory
    mode of every method is in tests/test_contract.py."""
    one, two = assert_two_ranks_equal_one(world_features, tmp_path, "pal", "--memory-budget", "0")
    assert one["data_mode"] == two["data_mode"] == "stream"
