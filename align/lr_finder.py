"""The learning-rate finder the PAL authors run before training (their `find_optimal_learning_rate`), for any trained
method of the loop (`TrainedConfig.lr_finder` = iterations, 0 = off).

What it does, as theirs does: from the initial parameters, AdamW (the method's betas and weight decay, no clipping)
takes one step per batch while the rate grows geometrically from `start` to `end` over `iters` steps; the loss of
each batch is recorded before its step, and the walk stops when a loss exceeds 5x the lowest so far (or is not
finite). The parameters are then put back. The curve is smoothed (s_0 = l_0, s_i = 0.05 s_{i-1} + 0.95 l_i), its
slope taken against log10(rate) (`numpy.gradient`), and the steepest descent before the smoothed minimum (indices 1 to
min(argmin, n - 1) - 1; else argmin - 1) picked; the rate used is that rate / 5, at least 10x `start`. With one point
or fewer it keeps the configured rate.

Where this differs, and why: their batches are random draws of a full batch from a random 5,000-row subset of the
training pairs; here the loop's own seeded batches (full-size ones only) of successive shuffled epochs, so that data
parallelism and resume see the same ones (with fewer pairs than a batch, both use every pair in every step). A
non-finite last loss is dropped before the pick (theirs would let NaN win numpy's argmin).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

SMOOTH = 0.05  # weight of the previous smoothed value (theirs)
DIVERGE = 5.0  # stop once a loss exceeds this multiple of the lowest so far
DIVISOR = 5.0  # the rate used is the steepest point's / 5


def pick_lr(lrs: list[float], losses: list[float], start: float) -> tuple[float | None, int | None]:
    """The authors' pick from a finder curve: (rate, index of the steepest point), or (None, None) with one point or
    fewer (the caller keeps its configured rate)."""
    pts = [(lr, loss) for lr, loss in zip(lrs, losses)]
    if pts and not math.isfinite(pts[-1][1]):
        pts = pts[:-1]
    if len(pts) <= 1:
        return None, None
    lr_arr = np.array([p[0] for p in pts], dtype=np.float64)
    smoothed = [pts[0][1]]
    for _, loss in pts[1:]:
        smoothed.append(smoothed[-1] * SMOOTH + loss * (1 - SMOOTH))
    s = np.array(smoothed)
    slope = np.gradient(s, np.log10(lr_arr))
    lowest = int(np.argmin(s))
    valid = list(range(1, min(lowest, len(slope) - 1)))
    steep = valid[int(np.argmin(slope[valid]))] if valid else max(0, lowest - 1)
    return max(float(lr_arr[steep]) / DIVISOR, start * 10), steep


def find_lr(
    params: list[Tensor],
    loss_of: Callable[[Any], Tensor],
    batches: Iterable[Any],
    *,
    iters: int,
    start: float,
    end: float,
    betas: tuple[float, float],
    weight_decay: float,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the finder on `batches` (at least `iters` of them) and put `params` back as they were. Returns the
    curve, the pick (`lr`: None when it could not pick) and why it stopped."""
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=start, betas=betas, weight_decay=weight_decay)
    mult = (end / start) ** (1 / iters)
    lrs: list[float] = []
    losses: list[float] = []
    best, stopped = math.inf, "iterations"
    try:
        for _, batch in zip(range(iters), batches):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(batch)
            value = float(loss.detach())
            lrs.append(opt.param_groups[0]["lr"])
            losses.append(value)
            if not math.isfinite(value) or value > DIVERGE * min(best, value):
                stopped = "diverged"
                break
            best = min(best, value)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            for g in opt.param_groups:
                g["lr"] *= mult
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    lr, steep = pick_lr(lrs, losses, start)
    return {
        "lr": lr,
        "steep_index": steep,
        "stopped": stopped,
        "iters": len(lrs),
        "start": start,
        "end": end,
        "lrs": lrs,
        "losses": losses,
    }
