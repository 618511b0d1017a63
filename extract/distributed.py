"""Extraction on a dask.distributed cluster: one task per shard, each worker writes only the shards it was given.

The task is the same `extract_shards` the local runner uses; the coordinator only creates the store before and marks
it complete after. `local:N` starts a LocalCluster of N single-threaded processes (GPU users: one worker per GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from pipe_align.extract.errors import PipeError
from pipe_align.extract.runner import ExtractConfig, ShardResult, default_threads, extract_shards, plan
from pipe_align.extract.store import open_store


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


def run_on_cluster(cfg: ExtractConfig, shards: list[int], cluster: str, advance: Callable[[int], None]):
    from dask.distributed import as_completed

    client, workers = _client(cluster, len(shards))
    try:
        if cfg.threads is None and cluster.startswith("local:"):
            from dataclasses import replace

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
