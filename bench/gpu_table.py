"""The table `bench/gpu.sh` prints: one row per check, measured against its goal (issue 14), pass or fail.

A section that crashes fills its rows with "crashed: <one line>" so the table is always complete; a section left out
for time says so. Peak bf16 rates come from a table by device name (dense, no sparsity), printed as an assumption.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peak from the vendors' data sheets (SXM parts), by name substring
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0,
}


def peak_bf16_tflops(name: str) -> float | None:
    """The first (longest) matching entry: "NVIDIA H100 PCIe" -> H100 PCIe, not H100."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


@dataclass
class Row:
    key: str
    what: str
    measured: str = "not run"
    goal: str = ""
    verdict: str = ""


class Table:
    def __init__(self, tiny: bool, budget_s: float) -> None:
        self.rows: dict[str, Row] = {}
        self.notes: list[str] = []
        self.tiny, self.t0, self.budget_s = tiny, time.perf_counter(), budget_s

    def add(self, key: str, what: str, goal: str) -> None:
        self.rows[key] = Row(key, what, goal=goal)

    def set(self, key: str, measured: str, ok: bool | None) -> None:
        """`ok` None: no verdict (no goal, or --tiny where speed means nothing)."""
        row = self.rows[key]
        row.measured = measured
        row.verdict = "n/a (tiny)" if self.tiny and ok is not None else ("" if ok is None else "PASS" if ok else "FAIL")

    def section(self, keys: list[str], fn: Callable[[], None], name: str, needs_s: float) -> None:
        """Run one section; a crash or a spent time budget is written into its rows instead of stopping the table."""
        left = self.budget_s - (time.perf_counter() - self.t0)
        if left < needs_s:
            for k in keys:
                self.rows[k].measured = f"skipped: {left:.0f} s of the time budget left, {name} needs ~{needs_s:.0f}"
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the table reports it and goes on
            line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]
            traceback.print_exc()
            for k in keys:
                if self.rows[k].measured == "not run":
                    self.rows[k].measured, self.rows[k].verdict = f"crashed: {line}", "FAIL"
        self.notes.append(f"{name}: {time.perf_counter() - t0:.1f} s")

    def print(self) -> None:
        rows = list(self.rows.values())
        head = ("check", "what", "measured", "goal", "result")
        cells = [head] + [(r.key, r.what, r.measured, r.goal, r.verdict) for r in rows]
        width = [max(len(c[i]) for c in cells) for i in range(5)]
        line = lambda c: "| " + " | ".join(x.ljust(w) for x, w in zip(c, width)) + " |"  # noqa: E731
        print(line(head))
        print("|" + "|".join("-" * (w + 2) for w in width) + "|")
        for c in cells[1:]:
            print(line(c))
        for note in self.notes:
            print(f"  {note}")
        print(f"  total {time.perf_counter() - self.t0:.1f} s")


def device_line() -> tuple[str, str, float | None]:
    """(device, name, assumed dense bf16 peak TFLOP/s or None)."""
    if not torch.cuda.is_available():
        return "cpu", "cpu", None
    name = torch.cuda.get_device_name(0)
    return "cuda", name, peak_bf16_tflops(name)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn` over `reps` after `warmup` calls (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
