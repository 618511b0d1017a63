"""Writing a file so that a reader never sees half of it and a planted link is never written through, and names that
become one path component (docs/guarantees.md, "Security").

`write_atomic` creates its temporary with `tempfile.mkstemp` in the target's folder (O_CREAT | O_EXCL: a file or link
already at any name is never opened), writes, fsyncs, then `os.replace`s it over the target, which replaces a link
at the target rather than writing into what it points at. Any failure removes the temporary and leaves the previous
file as it was; an OSError (a full disk, a file-size limit, no permission) is one line naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import PipeError

_NAME = re.compile(r"[A-Za-z0-9._-]+")
NAME_RULE = "letters, digits, '-', '_' and '.', not '.' or '..'"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; a replaced file gets what open() would have given it


def check_name(value: object, what: str) -> str:
    """`value` if it can be one path component (a run, store, split or recipe name), else a one-line PipeError naming
    `what` (the option or the file and key it came from)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise PipeError(f"{what}: {value!r} is not a name; allowed: {NAME_RULE}")
    return value


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write(f)` into an exclusively created temporary beside `path`, fsync, then rename it to `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_bytes(path: str | Path, data: bytes) -> None:
    def write(f: IO[bytes]) -> None:
        f.flush()
        view = memoryview(data)
        while view:  # os.write may write part of it (a filling disk): go on until all is written or it fails
            view = view[os.write(f.fileno(), view) :]

    write_atomic(path, write)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _write_error(path: Path, e: OSError) -> PipeError:
    code = errno.errorcode.get(e.errno or 0)
    cause = f"{e.strerror or e}" + (f" ({code})" if code else "")
    kept = "; the previous file is kept" if path.exists() else ""
    hint = {
        errno.ENOSPC: "; free space and re-run the same command",
        errno.EDQUOT: "; free space and re-run the same command",
        errno.EFBIG: "; raise the file-size limit (ulimit -f) and re-run",
    }.get(e.errno or 0, "")
    return PipeError(f"{path}: cannot be written: {cause}{kept}{hint}")
