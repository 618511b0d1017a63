"""What every stage uses at run time, below everything else (floor 0 with errors.py and files.py): which device a
run computes on, and a bounded background iterator. No module of ours is imported here, and torch only inside
`resolve_device`, so a stage can import this without loading anything heavy."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from .errors import PipeError


def resolve_device(device: str) -> str:
    """`auto` is CUDA where there is one, else the CPU; an explicit CUDA device on a machine without one is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PipeError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipeError(f"--device {device}: CUDA is not available on this machine")
    return device


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a thread, `depth` items ahead; exceptions re-raise in the consumer. When the consumer stops
    early (an error, a break) the producer is stopped and joined, so no thread is left decoding while the process
    reports the error and exits (a daemon thread busy at interpreter shutdown can abort it)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in it:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001
            put(e)
        put(end)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
