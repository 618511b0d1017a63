"""Checks shared by many test files (one definition, so that every file asks the same of the CLI)."""

from __future__ import annotations


def one_line_error(capsys, code: int, *fragments: str) -> str:
    """The house rule for bad input, checked on what a `main([...])` call left in `capsys`: exit code 2, exactly one
    non-empty stderr line, starting with `error:`, no traceback, and every fragment in that line. Returns the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
