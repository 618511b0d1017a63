"""`pipe extract`: plan a store, create or reopen it, hand its pending shards to an executor, mark it complete.

Two executors run the same shard function (`shards.extract_shards`): `run_local` in this process, and
`distributed.run_on_cluster` on a dask cluster (one task per shard). Planning lives in `job`, the shard work in
`shards`, both below this module and below `distributed`, so the import graph has no cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from pipe_align.extract.distributed import run_on_cluster
from pipe_align.extract.job import ExtractConfig, Job, plan
from pipe_align.extract.shards import ShardResult, extract_shards
from pipe_align.extract.store import FeatureStore, create_store

__all__ = ["ExtractConfig", "ExtractSummary", "executor", "run_extract", "run_local"]

Executor = Callable[[Job, FeatureStore, list[int], Callable[[int], None]], list[ShardResult]]


def run_local(job: Job, store: FeatureStore, shards: list[int], advance: Callable[[int], None]) -> list[ShardResult]:
    """The local executor: every given shard in this process (decode and write threads overlap the encoder)."""
    return extract_shards(job, store, shards, on_rows=advance)


def executor(cluster: str | None) -> Executor:
    """No cluster: this process. `local:N` or a scheduler address: one dask task per shard."""
    return partial(run_on_cluster, cluster=cluster) if cluster else run_local


@dataclass
class ExtractSummary:
    path: str
    rows: int
    written_rows: int
    skipped: list[tuple[str, str]]
    seconds: float
    already_complete: bool = False


def run_extract(cfg: ExtractConfig, cluster: str | None = None, progress: bool = True) -> ExtractSummary:
    """Plan, create (or reopen) the store, compute the pending shards with the executor `cluster` picks, finalize."""
    job = plan(cfg)
    store = create_store(job.path, job.layout)
    t0 = time.perf_counter()
    if store.complete:
        return ExtractSummary(job.path, job.layout.count, 0, [], 0.0, already_complete=True)
    pending = store.pending_shards()
    lay = job.layout
    todo_rows = sum(lay.shard_range(s)[1] - lay.shard_range(s)[0] for s in pending)
    with _progress(progress, f"{cfg.dataset}/{cfg.split} {cfg.encoder}", todo_rows) as advance:
        results = executor(cluster)(job, store, pending, advance)
    skipped = [s for r in results for s in r.skipped]
    store.finalize({"extract": _config_attrs(cfg)})
    return ExtractSummary(job.path, lay.count, sum(r.rows for r in results), skipped, time.perf_counter() - t0)


def _config_attrs(cfg: ExtractConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["options"] = dict(cfg.options)
    d.pop("threads")
    d.pop("features")  # the store's own location is not part of what it holds
    return d


class _progress:
    """A rich progress bar (rows, rows/s, ETA) when asked for; a no-op otherwise."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[progress.percentage]{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False,
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")
        self.t0, self.done = time.perf_counter(), 0

        def advance(n: int) -> None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} rows/s")

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
