"""The dask executor: one task per shard on a dask.distributed cluster; each worker writes only the shards it is given.

The task is the same `extract_shards` the local executor runs; the coordinator (runner.run_extract) only creates the
store before and marks it complete after. `local:N` starts a LocalCluster of N single-threaded processes (GPU users:
one worker per GPU). dask.distributed is imported when a cluster is asked for, so a local run never pays for it.
Worker logs are silenced (a PipeError raised on a worker reaches the caller as that PipeError, and the user sees its
one line, not the worker's report of it); the scheduler and workers of a remote cluster log where they run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

from .errors import PipeError
from .job import ExtractConfig, Job, plan
from .remote import set_storage_options, storage_options
from .shards import ShardResult, extract_shards
from .store import FeatureStore, open_store

_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
_QUIET = logging.CRITICAL  # dask's own log level on local workers and in this process while a cluster runs


def check_cluster(cluster: str) -> int | None:
    """`local:N` (N >= 1; returns N) or a scheduler address `tcp://host:port` / `tls://host:port` (returns None);
    anything else is a one-line error before any store is created."""
    if cluster.startswith("local:"):
        text = cluster.split(":", 1)[1]
        if not text.isdigit() or int(text) < 1:
            raise PipeError(f"--cluster local:N needs a number of workers N >= 1, got {cluster!r}")
        return int(text)
    m = _ADDRESS.match(cluster)
    if m is None or not 1 <= int(m.group(3)) <= 65535:
        raise PipeError(f"--cluster must be local:N or a dask scheduler address tcp://host:port, got {cluster!r}")
    return None


@lru_cache(maxsize=2)
def _job(cfg: ExtractConfig):
    """One plan per worker process and config: the dataset's annotations are parsed once, not once per shard."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's "Loading weights" bar would land on the user's terminal
    return plan(cfg)


def shard_task(cfg: ExtractConfig, shard: int, options: dict | None = None) -> ShardResult:
    """Runs on a worker: resolve the job (cached per process, like the encoder), write one shard. A worker whose plan
    differs from the store (weights changed on disk since the coordinator planned) refuses to write into it.
    `options`: the coordinator's storage options for a store URL (they travel with the task, never into the store)."""
    set_storage_options(options or {})
    job = _job(cfg)
    store = open_store(job.path, require_complete=False)
    if store.layout.to_attrs() != job.layout.to_attrs():
        raise PipeError(
            f"{job.path}: a worker resolved another layout than the store's (encoder weights or dataset "
            "changed during the run?); re-run when the inputs are stable"
        )
    return extract_shards(job, store, [shard])[0]


def _client(cluster: str, n_shards: int):
    from dask.distributed import Client, LocalCluster

    n = check_cluster(cluster)
    if n is not None:
        lc = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=_QUIET
        )
        return Client(lc), n
    try:
        client = Client(cluster, timeout="10s")
    except OSError as e:
        raise PipeError(f"--cluster {cluster}: cannot reach the dask scheduler ({e})") from None
    return client, len(client.scheduler_info().get("workers", {})) or 1


class _cluster_scope:
    """While a cluster runs: dask.distributed's loggers in this process at CRITICAL (nanny kill notices, failed-task
    reports). After: those levels and this process's environment as they were (a LocalCluster's nanny writes its
    workers' settings, e.g. MALLOC_TRIM_THRESHOLD_, into os.environ, where they would change later stages)."""

    def __enter__(self) -> None:
        self.environ = dict(os.environ)
        self.loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "asyncio")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(_QUIET)

    def __exit__(self, *exc) -> None:
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)
        for key in set(os.environ) - set(self.environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in self.environ.items() if os.environ.get(k) != v})


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
    with _cluster_scope():
        client, workers = _client(cluster, len(shards))
        try:
            if cfg.threads is None and cluster.startswith("local:"):
                cfg = replace(cfg, threads=default_threads(workers))
            opts = storage_options()
            futures = client.map(shard_task, [cfg] * len(shards), shards, [opts] * len(shards), pure=False)
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
