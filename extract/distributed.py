"""The dask executor: one task per shard on a dask.distributed cluster; each worker writes only the shards it is given.

The task is the same `extract_shards` the local executor runs; the coordinator (runner.run_extract) only creates the
store before and marks it complete after. `local:N` starts a LocalCluster of N single-threaded processes (GPU users:
one worker per GPU). dask.distributed is imported when a cluster is asked for, so a local run never pays for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

from pipe_align.extract.errors import PipeError
from pipe_align.extract.job import ExtractConfig, Job, plan
from pipe_align.extract.shards import ShardResult, extract_shards
from pipe_align.extract.store import FeatureStore, open_store


@lru_cache(maxsize=2)
def _job(cfg: ExtractConfig):
    """One plan per worker process and config: the dataset's annotations are parsed once, not once per shard."""
    return plan(cfg)


def shard_task(cfg: ExtractConfig, shard: int) -> ShardResult:
    """Runs on a worker: resolve the job (cached per process, like the encoder), write one shard."""
    job = _job(cfg)
    store = open_store(job.path, require_complete=False)
    return extract_shards(job, store, [shard])[0]


def _client(cluster: str, n_shards: int):
    from dask.distributed import Client, LocalCluster

    if cluster.startswith("local:"):
        try:
            n = int(cluster.split(":", 1)[1])
        except ValueError:
            raise PipeError(f"--cluster local:N needs a number of workers, got {cluster!r}") from None
        if n < 1:
            raise PipeError(f"--cluster local:N needs N >= 1, got {cluster!r}")
        lc = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(lc), n
    try:
        client = Client(cluster, timeout="10s")
    except OSError as e:
        raise PipeError(f"--cluster {cluster}: cannot reach the dask scheduler ({e})") from None
    return client, len(client.scheduler_info().get("workers", {})) or 1


def default_threads(workers: int) -> int:
    """Torch threads per worker process so that N local workers share the cores instead of oversubscribing them."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_on_cluster(
    job: Job, store: FeatureStore, shards: list[int], advance: Callable[[int], None], *, cluster: str
) -> list[ShardResult]:
    """The dask executor. Workers re-plan from `job.cfg` (cached per process) and reopen `store` by its path: only the
    config and shard ids travel, never the dataset, the encoder or the store object."""
    from dask.distributed import as_completed

    cfg = job.cfg
    client, workers = _client(cluster, len(shards))
    try:
        if cfg.threads is None and cluster.startswith("local:"):
            cfg = replace(cfg, threads=default_threads(workers))
        futures = client.map(shard_task, [cfg] * len(shards), shards, pure=False)
        results = []
        for fut in as_completed(futures):
            res = fut.result()
            results.append(res)
            advance(res.rows)
        return sorted(results, key=lambda r: r.shard)
    finally:
        lc = getattr(client, "cluster", None)
        client.close()
        if cluster.startswith("local:") and lc is not None:
            lc.close()
