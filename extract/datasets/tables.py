"""`csv`: image-caption pairs listed in a table, a .csv, .tsv or .jsonl file, the way open_clip trains from one
(columns `filepath` and `title` by default). Also the table reading behind imagefolder's `metadata.jsonl` /
`metadata.csv` (Hugging Face's imagefolder convention).

Tables are read whole when the reader opens (100,000 rows are a few MB of text); images only on `load_image`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..errors import PipeError
from .base import CaptionFiles, register_dataset
from .pairs import PairGroups, caption_texts, string_option

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
SEPARATORS = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}

Rows = list[tuple[int, dict[str, object]]]  # (line number, cells by column)


def separator_option(dataset: str, value: object) -> str | None:
    """`-o separator=`: one character; `\\t` and `tab` (what a shell passes for a tab) mean a tab."""
    if value is None:
        return None
    sep = SEPARATORS.get(str(value), str(value))
    if len(sep) != 1 or sep in '"\r\n':
        raise PipeError(f"dataset '{dataset}': option separator={value!r} must be one character (e.g. ',' or tab)")
    return sep


def _decode(path: Path) -> str:
    """The file as text: UTF-8, a leading BOM dropped (spreadsheets write one); other bytes name the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PipeError(f"{path} is not UTF-8 text (line {line}: {e.reason})") from None


def _guess_separator(path: Path, header: str, image_key: str) -> str:
    """.tsv is tab-separated; for other names, the separator under which the header has the image column, comma
    first (open_clip's default is a tab, a spreadsheet's a comma: the header tells them apart)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    for sep in (",", "\t", ";", "|"):
        if image_key in [c.strip() for c in header.split(sep)]:
            return sep
    return ","


def read_delimited(path: Path, separator: str | None, image_key: str) -> tuple[list[str], Rows]:
    """(columns, rows) of a CSV/TSV file with a header line; a row whose field count differs from the header's, or
    a malformed quote, is an error naming the line."""
    text = _decode(path)
    sep = separator or _guess_separator(path, text.split("\n", 1)[0], image_key)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    rows: Rows = []
    columns: list[str] | None = None
    try:
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if columns is None:
                columns = [c.strip() for c in fields]
                continue
            if len(fields) != len(columns):
                raise PipeError(
                    f"{path} line {reader.line_num} has {len(fields)} fields, the header has "
                    f"{len(columns)} (separator {sep!r}; set -o separator=)"
                )
            rows.append((reader.line_num, dict(zip(columns, fields))))
    except csv.Error as e:
        raise PipeError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    if columns is None:
        raise PipeError(f"{path} is empty (expected a header line naming the columns)")
    return columns, rows


def read_jsonl(path: Path) -> tuple[list[str], Rows]:
    """(keys of the first object, rows) of a JSON-lines file: one object per line, blank lines skipped."""
    rows: Rows = []
    for n, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipeError(f"malformed JSON in {path} line {n} column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise PipeError(f"{path} line {n} is not a JSON object")
        rows.append((n, obj))
    if not rows:
        raise PipeError(f"{path} is empty (expected one JSON object per line)")
    return list(rows[0][1]), rows


def read_table(path: Path, separator: str | None, image_key: str) -> tuple[list[str], Rows]:
    return read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_delimited(path, separator, image_key)


def require_columns(path: Path, columns: list[str], rows: Rows, needed: dict[str, str]) -> None:
    """Every needed column is there (in the header, or in every JSON object); a missing one names the columns there
    are and the option that picks another. `needed` maps column -> option name."""
    for col, option in needed.items():
        if col not in columns:
            raise PipeError(
                f"{path} has no column '{col}' (columns: {', '.join(columns)}); choose one with -o {option}="
            )
        missing = next((n for n, cells in rows if col not in cells), None)
        if missing is not None:
            keys = ", ".join(next(c for n, c in rows if n == missing))
            raise PipeError(f"{path} line {missing} has no '{col}' (keys: {keys})")


def image_id(path: Path, base: Path) -> str:
    """A file's id: its path relative to the table's folder, without suffix (as imagefolder's ids), or the absolute
    path without suffix for a file outside it."""
    rel = os.path.relpath(path, base)
    name = Path(rel) if not rel.startswith("..") else path
    return name.with_suffix("").as_posix() if name.suffix else name.as_posix()


def group_rows(dataset: str, table: Path, rows: Rows, image_key: str, caption_key: str) -> PairGroups:
    """Rows -> images (rows naming the same file, after resolving it, are one image) with their captions."""
    groups = PairGroups(dataset)
    base = table.parent
    for line, cells in rows:
        where = f"{table} line {line}"
        ref = cells[image_key]
        if not isinstance(ref, str) or not ref.strip():
            raise PipeError(f"{where}: the image path ('{image_key}') is empty or not text: {json.dumps(ref)[:60]}")
        path = Path(os.path.normpath(base / ref.strip()))
        groups.add(str(path), image_id(path, base), path, caption_texts(cells[caption_key], where), where)
    return groups


def find_table(dataset: str, root: str | Path | None) -> Path:
    """--root: the table file, or a folder holding exactly one .csv/.tsv/.jsonl file."""
    if root is None:
        raise PipeError(f"dataset '{dataset}' needs --root: a .csv, .tsv or .jsonl file of image-caption pairs")
    path = Path(root).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise PipeError(f"dataset '{dataset}': --root {path} does not exist")
    found = [p for p in sorted(path.iterdir()) if p.suffix.lower() in TABLE_SUFFIXES and p.is_file()]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise PipeError(
            f"dataset '{dataset}': {what} {'/'.join(TABLE_SUFFIXES)} files in {path}; point --root at the table"
        )
    return found[0]


@register_dataset("csv")
class CsvPairs(CaptionFiles):
    """One table of pairs. Image paths are relative to the table's folder (or absolute); rows naming the same image
    are one image with several captions (file order). With a `split` column, `--split` picks its rows; without one,
    `--split` names the whole table. Ids: the image's path without suffix; captions `<image id>#<j>`."""

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        *,
        image_key: str = "filepath",
        caption_key: str = "title",
        separator: str | None = None,
        split_key: str = "split",
    ) -> None:
        super().__init__(root, split)
        image_key = string_option(self.name, "image_key", image_key)
        caption_key = string_option(self.name, "caption_key", caption_key)
        split_key = string_option(self.name, "split_key", split_key)
        self.file = find_table(self.name, root)
        columns, rows = read_table(self.file, separator_option(self.name, separator), image_key)
        require_columns(self.file, columns, rows, {image_key: "image_key", caption_key: "caption_key"})
        if split_key in columns:
            require_columns(self.file, columns, rows, {split_key: "split_key"})
            present = list(dict.fromkeys(str(cells[split_key]) for _, cells in rows))
            rows = [(n, cells) for n, cells in rows if str(cells[split_key]) == split]
            if not rows:
                raise PipeError(
                    f"dataset '{self.name}': no rows of split '{split}' in {self.file} (column "
                    f"'{split_key}' holds: {', '.join(present[:20])})"
                )
        if not rows:
            raise PipeError(f"dataset '{self.name}': {self.file} has no rows")
        groups = group_rows(self.name, self.file, rows, image_key, caption_key)
        self._records, self._paths, self._captions = groups.records, groups.sources, groups.captions()
