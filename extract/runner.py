"""`pipe extract`: plan a store, create or reopen it, hand its pending shards to an executor, mark it complete.

Two executors run the same shard function (`shards.extract_shards`): `run_local` in this process, and
`distributed.run_on_cluster` on a dask cluster (one task per shard). Planning lives in `job`, the shard work in
`shards`, both below this module and below `distributed`, so the import graph has no cycle.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, TextIO

from .claim import claim
from .distributed import check_cluster, run_on_cluster
from .job import ExtractConfig, Job, check_config, plan
from .phrases import write_phrases
from .shards import ShardResult, disk_full, extract_shards
from .store import FeatureStore, create_store

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
    """Plan, create (or reopen) the store, compute the pending shards with the executor `cluster` picks, finalize.
    Every bad option is refused before the store exists; a full disk is a one-line error and leaves the store
    incomplete (a re-run resumes it). The store's claim is held throughout: a second process extracting the same
    store meanwhile is refused in one line naming this one."""
    check_config(cfg)
    if cluster is not None:
        check_cluster(cluster)
    job = plan(cfg)
    try:
        with claim(job.path):  # from creation to `complete`: another extract of this store is refused meanwhile
            return _run(cfg, job, cluster, progress)
    except OSError as e:
        full = disk_full(e, job.path, "extracting")
        if full is None:
            raise
        raise full from None


def _run(cfg: ExtractConfig, job: Job, cluster: str | None, progress: bool) -> ExtractSummary:
    summary = _run_store(cfg, job, cluster, progress)
    if job.text_mode == "captions" and job.dataset.phrase_store:  # grounding reads the phrases as their own texts
        run_extract(replace(cfg, text="phrases"), cluster, progress)
    return summary


def _run_store(cfg: ExtractConfig, job: Job, cluster: str | None, progress: bool) -> ExtractSummary:
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
    if job.text_mode == "captions" and job.dataset.has_boxes():
        write_phrases(store, job.encoder.tokenizer, job.captions)
    store.finalize({"extract": _config_attrs(cfg)})
    return ExtractSummary(job.path, lay.count, sum(r.rows for r in results), skipped, time.perf_counter() - t0)


def _config_attrs(cfg: ExtractConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["options"] = dict(cfg.options)
    d.pop("threads")
    d.pop("features")  # the store's own location is not part of what it holds
    return d


class _progress:
    """Rows, rows/s and ETA on stderr when asked for. On a terminal: rich's live bar. Anywhere else (a log file, CI,
    a pipe): plain whole lines, one per tenth of the rows and at least one a minute, never a bar redrawn or wrapped
    across lines. A no-op when not asked for."""

    PLAIN_STEP, PLAIN_SECONDS = 0.1, 60.0

    def __init__(self, enabled: bool, label: str, total: int, stream: TextIO | None = None) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self.stream = stream or sys.stderr
        self.bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        self.t0, self.done = time.perf_counter(), 0
        isatty = getattr(self.stream, "isatty", None)
        if not (isatty and isatty()):
            return self._plain()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[progress.percentage]{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            transient=False,
            console=Console(file=self.stream),
        )
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")

        def advance(n: int) -> None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} rows/s")

        return advance

    def _plain(self) -> Callable[[int], None]:
        shown, last = 0, self.t0

        def advance(n: int) -> None:
            nonlocal shown, last
            self.done += n
            now = time.perf_counter()
            due = self.done - shown >= self.PLAIN_STEP * self.total or now - last >= self.PLAIN_SECONDS
            if self.done >= self.total or due:
                shown, last = self.done, now
                rate = self.done / max(now - self.t0, 1e-9)
                eta = (self.total - self.done) / rate if rate > 0 else 0.0
                pct = 100.0 * self.done / max(self.total, 1)
                print(
                    f"{self.label}: {self.done}/{self.total} rows ({pct:.0f}%), {rate:.1f} rows/s, ETA {_clock(eta)}",
                    file=self.stream,
                    flush=True,
                )

        return advance

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
