"""One comparison table over evaluated runs: runs as rows, a chosen subset of metrics as columns.

Reads only the result JSONs under RUN/eval/ (never features), so a report is instant and can be rebuilt any time.
Markdown shows percentages with one decimal (how papers print them); the CSV keeps the JSON's fractions at full
precision for further processing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from pipe_align.extract.errors import PipeError
from pipe_align.extract.files import write_text

from .claims import claims_markdown
from .tasks import all_tasks


def headline(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The summary numbers of one result (per-class values, config and notes left out), for the printed table."""
    skip = ("iou/", "acc/")
    out = []
    for key, value in result.items():
        if key in ("config", "protocol_note") or any(s in key for s in skip) or isinstance(value, (dict, list)):
            continue
        out.append((key, value))
    return out


def format_headline(result: dict[str, Any]) -> str:
    rows = headline(result)
    width = max(len(k) for k, _ in rows)
    lines = []
    for key, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def _results(run: Path, tasks: dict[str, tuple[int, type]]) -> list[dict[str, Any]]:
    """The results of registered tasks in RUN/eval; a file there that is no result, or holds a column value that is
    no number, is an error (a report never shows what it cannot vouch for)."""
    out = []
    for path in sorted((run / "eval").glob("*.json")):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PipeError(f"{path}: malformed result JSON; re-run that eval") from None
        if not isinstance(res, dict) or not isinstance(res.get("task"), str):
            raise PipeError(f'{path}: not an eval result (a JSON object with a "task"); re-run that eval')
        if res["task"] in tasks:
            for key, _ in tasks[res["task"]][1].columns:
                value = res.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise PipeError(f"{path}: {key} is {value!r}, not a number; re-run that eval")
            out.append(res)
    return out


def _method(run: Path) -> str:
    for name in ("run.json", "method.json"):
        path = run / name
        if path.is_file():
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(meta, dict):
                return str(meta.get("method", "?"))
    return "?"


def build_table(runs: list[Path]) -> tuple[list[str], list[list[Any]]]:
    """Header ["run", "method", columns...] and one row per run (None where a run lacks that number)."""
    if not runs:
        raise PipeError("pipe report: give at least one run dir")
    tasks = {t.name: (rank, t) for rank, t in enumerate(all_tasks())}  # the columns each task contributes
    columns: dict[tuple, str] = {}
    cells: list[dict[tuple, float]] = []
    for run in runs:
        if not run.is_dir():
            raise PipeError(f"pipe report: {run}: no such run dir")
        row: dict[tuple, float] = {}
        for res in _results(run, tasks):
            rank, task = tasks[res["task"]]
            protocol = res.get("protocol")
            scope = f"{res.get('dataset')}/{res.get('split')}"
            tag = task.report_tag + (f"[{protocol}]" if protocol else "")
            for m, (key, label) in enumerate(task.columns):
                if key in res:
                    col = (rank, scope, protocol or "", m)
                    columns[col] = " ".join(p for p in (scope, tag, label) if p)
                    row[col] = res[key]
        cells.append(row)
    order = sorted(columns)
    header = ["run", "method"] + [columns[c] for c in order]
    rows = [[run.resolve().name, _method(run)] + [row.get(c) for c in order] for run, row in zip(runs, cells)]
    return header, rows


def _pct(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{100 * float(value):.1f}"


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([str(row[0]), str(row[1])] + [_pct(v) for v in row[2:]]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def write_report(
    runs: list[Path], out: Path | None = None, claim_runs: tuple[Path, ...] = ()
) -> tuple[Path, Path, str]:
    """Write the Markdown and CSV tables (default: next to the first run, report.md / report.csv); the claims section
    reads `runs` and `claim_runs` (runs that measure a claim only, such as a pooled control, not table rows)."""
    header, rows = build_table(runs)
    base = Path(out) if out is not None else runs[0].resolve().parent / "report"
    if base.suffix.lower() in (".md", ".csv"):
        base = base.with_suffix("")
    md_path, csv_path = base.with_name(base.name + ".md"), base.with_name(base.name + ".csv")
    text = to_markdown(header, rows)
    claims = claims_markdown([*runs, *claim_runs])
    text += f"\n{claims}" if claims else ""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    note = "Values in percent (fractions in the CSV); '-' = not evaluated, 'n/a' = undefined.\n\n"
    write_text(md_path, "# Evaluation report\n\n" + note + text)
    write_text(csv_path, to_csv(header, rows))
    return md_path, csv_path, text
