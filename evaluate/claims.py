"""The claims section of `pipe report`: each claim of the PAL paper, the measurement that tests it on the reported
runs' data, and "holds" or "does not hold" with the numbers, never a verdict without its measurement.

Read from the result JSONs under RUN/eval/ only (like the table). The rules (docs/claims.md):
- token correspondence: a run's pointing accuracy is above the box-area chance level by more than two binomial
  standard errors, sqrt(c (1 - c) / n);
- the per-token profiles matter: full PAL scores above its pooled control (`--profile pooled`) on a shared metric;
- no collapse: within-sample variance of the token similarity vectors is at least COLLAPSE_RATIO of the shuffled
  control's, image and text;
- transfer to unseen classes: unseen-class accuracy above chance among the competing classes (1 / classes);
- gains come from correspondence: `pipe claims`'s verdict (its correlation, p-value and gains).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLLAPSE_RATIO = 0.1  # below a tenth of the modality-level spread, the vectors are near-constant within a sample
# (task, metric, label, the result's count of queries the metric is a fraction of; None: no sampling error known)
SHARED = (
    ("grounding", "pointing_acc", "pointing acc", "phrases"),
    ("segmentation", "fg_mIoU", "fg mIoU", None),
    ("segmentation", "mIoU", "mIoU", None),
    ("retrieval", "text_retrieval_recall@1", "I2T R@1", "images"),
    ("retrieval", "image_retrieval_recall@1", "T2I R@1", "captions"),
)


def two_se(p: float, n: int) -> float:
    """Twice the binomial standard error of a fraction p measured on n queries."""
    return 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _results(run: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((run / "eval").glob("*.json")) if (r := _json(p)) and isinstance(r.get("task"), str)]


def _profile(run: Path) -> str | None:
    """ "tokens" or "pooled" for a PAL run, None for other methods."""
    meta = _json(run / "run.json") or _json(run / "method.json") or {}
    if meta.get("method") != "pal":
        return None
    return str((meta.get("config") or {}).get("profile", "tokens"))


def _verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def claim_lines(runs: list[Path]) -> list[str]:
    """Markdown bullet lines, one per measurement found among the runs' results."""
    lines: list[str] = []
    by_run = {run: _results(run) for run in runs}
    name = {run: run.resolve().name for run in runs}
    for run, results in by_run.items():
        for r in results:
            where = f"{r.get('dataset')}/{r.get('split')}"
            if r["task"] == "grounding":
                acc, c, n = r["pointing_acc"], r["chance"], r["phrases"]
                margin = 2 * math.sqrt(c * (1 - c) / max(n, 1))
                lines.append(
                    f"- **Token correspondence** ({name[run]}, {r.get('method')}, {where}, {n} phrases): "
                    f"pointing accuracy {_pct(acc)} vs chance {_pct(c)} (+2 s.e. = {_pct(c + margin)}): "
                    f"{_verdict(acc > c + margin)}."
                )
            elif r["task"] == "collapse":
                fig = run / "eval" / "figures" / f"collapse-{r.get('dataset')}-{r.get('split')}-variance.png"
                ri, rt = r["image_within_over_shuffled"], r["text_within_over_shuffled"]
                lines.append(
                    f"- **No collapse within a sample** ({name[run]}, {where}): within-sample variance / "
                    f"shuffled control = {ri:.3g} (image), {rt:.3g} (text); trained / untrained anchors "
                    f"{r['image_within_over_untrained']:.3g} (image), {r['text_within_over_untrained']:.3g} "
                    f"(text); threshold {COLLAPSE_RATIO}: "
                    f"{_verdict(min(ri, rt) >= COLLAPSE_RATIO)} (figure: {fig})."
                )
            elif r["task"] == "classification" and "unseen_acc" in r:
                chance = 1 / max(int(r.get("classes", 1)), 1)
                n = int(r.get("unseen_images", 0))
                bar = chance + (two_se(chance, n) if n else 0.0)
                bar_text = f" (+2 s.e. over {n} images = {_pct(bar)})" if n else ""
                lines.append(
                    f"- **Transfer to unseen classes** ({name[run]}, {r.get('method')}, {where}): unseen "
                    f"{_pct(r['unseen_acc'])} ({', '.join(r.get('unseen_names', []))}) vs chance "
                    f"{_pct(chance)}{bar_text}; seen {_pct(r['seen_acc'])}: "
                    f"{_verdict(r['unseen_acc'] > bar)}."
                )
            elif r["task"] == "claims":
                gf, gw = r.get("mean_gain_grounding_fails"), r.get("mean_gain_grounding_works")
                lines.append(
                    f"- **Gains come from correspondence** ({name[run]} vs {r.get('best_baseline')}, "
                    f"{where}, {r['images']} images): Spearman {r['spearman']:.3f} (p {r['spearman_p']:.3g}) "
                    f"between rank gain and grounding accuracy; mean gain {gf if gf is None else f'{gf:.2f}'}"
                    f" where grounding fails, {gw if gw is None else f'{gw:.2f}'} where it works: "
                    f"{_verdict(bool(r['holds']))}."
                )
    lines += _pooled_lines(by_run, name)
    return lines


def _pooled_lines(by_run: dict[Path, list[dict[str, Any]]], name: dict[Path, str]) -> list[str]:
    """Full PAL vs its pooled control on every metric both were evaluated on (same task, dataset, split)."""
    full = [r for r in by_run if _profile(r) == "tokens"]
    pooled = [r for r in by_run if _profile(r) == "pooled"]
    lines = []
    for f in full:
        for p in pooled:
            for task, key, label, count in SHARED:
                a = {(r.get("dataset"), r.get("split"), r.get("protocol")): r for r in by_run[f] if r["task"] == task}
                b = {(r.get("dataset"), r.get("split"), r.get("protocol")): r for r in by_run[p] if r["task"] == task}
                for scope in sorted(set(a) & set(b), key=str):
                    if key in a[scope] and key in b[scope]:
                        x, y = a[scope][key], b[scope][key]
                        n = int(a[scope].get(count, 0)) if count else 0
                        # a difference of two fractions on the same n queries: 2 s.e. of the difference
                        margin = math.hypot(two_se(x, n), two_se(y, n)) if n else 0.0
                        what = (
                            f", difference {100 * (x - y):+.1f} points vs 2 s.e. {100 * margin:.1f}"
                            if n
                            else " (no sampling error known: plain comparison)"
                        )
                        lines.append(
                            f"- **Per-token profiles matter** ({name[f]} vs pooled {name[p]}, "
                            f"{scope[0]}/{scope[1]}, {label}): full {_pct(x)} vs pooled {_pct(y)}{what}: "
                            f"{_verdict(x - y > margin)}."
                        )
    return lines


def claims_markdown(runs: list[Path]) -> str:
    """The report's "Claims" section, or "" when no run has a measurement of a claim."""
    lines = claim_lines(runs)
    if not lines:
        return ""
    head = (
        "## Claims of the PAL paper on this data\n\nEach claim with its measurement; the rules are in "
        "docs/claims.md.\n\n"
    )
    return head + "\n".join(lines) + "\n"
