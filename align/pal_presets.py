"""PAL's presets: named, explicit sets of PAL settings that `pipe align --preset NAME` resolves before training,
recorded in run.json ("preset") and printed. Only `align/pal.py` imports this file: its hook methods
(`PAL.preset_plan`, `PAL.preset_search`) call the functions here. What the user gives on the command line
(`--anchors`, `--epochs`, `--lr`, any option) always wins over a preset; the preset fills in the rest.

- `paper`: the PAL authors' settings exactly (`PALConfig`'s defaults and `PAL.run_defaults`: CLS + patches pooled,
  per-bank clipping at 1.0, a 100-iteration LR finder, per-batch CosineAnnealingLR with a 50-epoch half period and no
  warm-up, up to 1000 epochs with patience 200, batch 4096, AdamW (0.9, 0.95), weight decay 1e-4, tau 0.05, tau_p
  0.03, K = 512).
- `small`: for a few hundred to a few thousand pairs. The authors' optimiser, temperatures and per-bank clipping, but
  batches of 64 pairs, lr 1e-3 with cosine decay to zero and no LR finder, and a budget of optimiser steps rather
  than of epochs. K (from `K_GRID`) and whether the CLS token is pooled are picked on the held-out pairs of the
  training split: each candidate trains about `PROBE_STEPS` steps (never more epochs than the final training) on the
  training pairs and is scored by held-out mean R@1
  (ties: lower held-out loss, then the earlier candidate); K first, patches only, then CLS pooled at that K. Then one
  training of `FINAL_STEPS` steps (patience: a fifth of its epochs, at least 10). Without held-out pairs nothing
  can be picked and the first candidate's settings are used.
- `auto` (the default): `small` when the training split has fewer than `SMALL_PAIRS` pairs (fewer than one of the
  authors' batches, so their settings would take one optimiser step per epoch), else `paper`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from typing import Any

from .base import Plan, TrainedAligner, TrainingData
from .ddp import DataParallel
from .loop import NonFinite, RunConfig, fit, heldout_loss, heldout_retrieval

PRESETS = ("auto", "paper", "small")  # the first is the default
SMALL_PAIRS = 4096
K_GRID = (64, 128, 256, 512)
SMALL_BATCH = 64
PROBE_STEPS = 50
FINAL_STEPS = 300
# The small preset's fixed settings (the rest are PALConfig's, the authors').
SMALL_PARAMS = {"lr": 1e-3, "schedule": "cosine", "warmup_epochs": 0.0, "lr_finder": 0}
# What `pipe align --help` shows for an option the small preset decides when it is not given.
SMALL_HELP = {k: str(v) for k, v in SMALL_PARAMS.items()} | {
    "anchors": "picked from " + "/".join(map(str, K_GRID)),
    "use_cls": "picked",
    "batch_size": str(SMALL_BATCH),
    "epochs": f"a {FINAL_STEPS}-step budget",
    "patience": "a fifth of the epochs",
}


def user_wins(params: dict[str, Any]) -> dict[str, Any]:
    """A rate given by the user is the rate used: the LR finder is off unless the user also asked for it."""
    if "lr" in params and "lr_finder" not in params:
        return params | {"lr_finder": 0}
    return params


def plan_paper(method: type[TrainedAligner], params: dict[str, Any], run: RunConfig, why: str, requested: str) -> Plan:
    record = {
        "requested": requested,
        "name": "paper",
        "why": why,
        "user": dict(params),
        "summary": "paper: the PAL authors' settings" + _given(params, run),
    }
    return Plan(user_wins(dict(params)), run.resolved(method), record)


def plan(
    method: type[TrainedAligner], preset: str, params: dict[str, Any], run: RunConfig, n_train: int
) -> Plan | None:
    """The plan of a preset that needs no search, or None when the small-data search must run."""
    if preset == "paper":
        return plan_paper(method, params, run, "asked for (--preset paper)", preset)
    if preset == "auto" and n_train >= SMALL_PAIRS:
        return plan_paper(method, params, run, f"{n_train} training pairs >= {SMALL_PAIRS}: not small", preset)
    return None


def small_batch(n_train: int, run: RunConfig) -> int:
    return run.batch_size or min(SMALL_BATCH, max(2, n_train // 4))


def steps_to_epochs(steps: int, n_train: int, batch: int) -> int:
    return max(1, math.ceil(steps / max(1, math.ceil(n_train / batch))))


def search_small(
    method: type[TrainedAligner],
    params: dict[str, Any],
    run: RunConfig,
    data: TrainingData,
    requested: str,
    dp: DataParallel | None = None,
    say: bool = False,
) -> Plan:
    """The `small` preset: probe the candidates on the held-out pairs, then plan the final training."""
    n = len(data.train)
    batch = small_batch(n, run)
    base = SMALL_PARAMS | user_wins(dict(params))
    why = "asked for (--preset small)" if requested == "small" else f"{n} training pairs < {SMALL_PAIRS}: small"
    ks = [params["anchors"]] if "anchors" in params else list(K_GRID)
    tried: list[dict[str, Any]] = []
    epochs = run.epochs or steps_to_epochs(FINAL_STEPS, n, batch)
    probe_epochs = min(epochs, steps_to_epochs(PROBE_STEPS, n, batch))  # never longer than the final training

    def probe(extra: dict[str, Any]) -> dict[str, Any]:
        cfg = method.Config(**(base | extra))
        probe_run = replace(run, epochs=probe_epochs, batch_size=batch, patience=0)
        t0 = time.perf_counter()
        entry: dict[str, Any] = dict(extra)
        try:
            res = fit(method, cfg, probe_run, data, dp=dp)
            entry |= {
                "heldout_mean_r1": heldout_retrieval(res.aligner, data.val, run.seed)["heldout_mean_r1"],
                "val_loss": heldout_loss(res.aligner, data.val, batch, run.seed).get("val_loss"),
            }
        except NonFinite as e:
            entry |= {"heldout_mean_r1": -1.0, "val_loss": math.inf, "failed": str(e)}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        tried.append(entry)
        if say:
            print(
                f"pal preset small: probe {extra} -> held-out mean R@1 {entry['heldout_mean_r1']:.3f}, loss "
                f"{entry['val_loss']:.3f} ({entry['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return entry

    def best(entries: list[dict[str, Any]]) -> dict[str, Any]:
        return min(entries, key=lambda e: (-e["heldout_mean_r1"], e["val_loss"]))  # stable: earlier wins ties

    chosen: dict[str, Any]
    if data.val is None or len(data.val) < 2:
        chosen = {"anchors": ks[0]} | ({} if "use_cls" in params else {"use_cls": False})
        how = "no held-out pairs: the first candidate, nothing probed"
    else:
        cls_first = params.get("use_cls", False)
        at_k = [probe({"anchors": k, "use_cls": cls_first}) for k in ks] if len(ks) > 1 else []
        k = best(at_k)["anchors"] if at_k else ks[0]
        if "use_cls" in params:
            chosen = {"anchors": k, "use_cls": params["use_cls"]}
        else:
            plain = next((e for e in at_k if e["anchors"] == k), None) or probe({"anchors": k, "use_cls": False})
            with_cls = probe({"anchors": k, "use_cls": True})
            chosen = {key: best([plain, with_cls])[key] for key in ("anchors", "use_cls")}
        how = f"probes of {probe_epochs} epochs (about {PROBE_STEPS} steps at most), best held-out mean R@1"
    final_run = replace(
        run,
        batch_size=batch,
        epochs=epochs,
        patience=run.patience if run.patience is not None else max(10, epochs // 5),
    )
    final = base | chosen
    budget = f"{FINAL_STEPS} steps" if run.epochs is None else f"{epochs} epochs (given)"
    summary = (
        f"small: K={final['anchors']} ({'given' if 'anchors' in params else 'picked'}), "
        f"{'CLS + patches' if final.get('use_cls', True) else 'patches only'} "
        f"({'given' if 'use_cls' in params else 'picked'}), batch {batch}, {budget} = {epochs} epochs, "
        f"lr {final['lr']:g}" + _given(params, run)
    )
    record = {
        "requested": requested,
        "name": "small",
        "why": why,
        "user": dict(params),
        "how": how,
        "probe_epochs": probe_epochs,
        "final_steps": FINAL_STEPS if run.epochs is None else None,
        "tried": tried,
        "chosen": chosen,
        "summary": summary,
    }
    return Plan(final, final_run, record)


def _given(params: dict[str, Any], run: RunConfig) -> str:
    given = [f"--{k.replace('_', '-')} {v}" for k, v in sorted(params.items())]
    given += [
        f"--{k.replace('_', '-')} {getattr(run, k)}"
        for k in ("epochs", "batch_size", "patience")
        if getattr(run, k) is not None
    ]
    return f"; given: {', '.join(given)}" if given else ""
