"""Who is writing a feature store: an exclusive claim beside it, so that two processes never create or write one store
at the same time.

The claim is the file `<store>.claim`, held with an exclusive `flock` for as long as the process creates or writes
the store, and holding that process's PID, host and start time. A second process finds the lock taken and refuses in
one line naming the first. The kernel drops the lock of a process that ends in any way (kill -9 included), so a claim
left by a dead process is simply taken over by the next run; nothing needs cleaning up by hand. Locks are advisory:
they exclude other `pipe` processes, which is what they are for.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PipeError
from .remote import is_url

SUFFIX = ".claim"
OWNER_WAIT_S = 1.0  # how long a refused process waits for the winner to have written who it is (microseconds, usually)

_held: dict[str, tuple[int, int]] = {}  # claim file -> (descriptor, depth): claims this process holds (re-entrant)
_held_lock = threading.Lock()


def claim_path(store: Path) -> Path:
    return store.with_name(store.name + SUFFIX)


def check_parent(path: Path) -> None:
    """One line when a folder on the way to `path` is a file (a wrong --features)."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise PipeError(f"{parent}: is a file, not a folder (check --features)")
            return


@contextmanager
def claim(store: str | Path) -> Iterator[None]:
    """Hold the store's claim for the block; PipeError naming the holder when another process holds it. Nested use in
    one process (the runner holds it, `create_store` takes it again) is allowed. A store on object storage has no
    claim (no flock there; docs/store.md "Remote stores")."""
    if is_url(store):
        yield
        return
    store = Path(store)
    path = claim_path(store)
    key = str(path.absolute())
    with _held_lock:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            fd = -1
        else:
            fd = _acquire(path, store)
            _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _held_lock:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                _release(path, fd)


def _acquire(path: Path, store: Path) -> int:
    check_parent(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        try:  # O_NOFOLLOW: a link planted at the claim's name is an error, never a file written through
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise PipeError(f"{path}: cannot create the store's claim file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise PipeError(
                f"{store}: being created by {owner}; a store is written by one process at a time: wait "
                "for it to finish, then re-run (the store is reused or resumed)"
            ) from None
        # Locked, but the holder before us may have released (and unlinked) the file between our open and our lock:
        # then this lock is on a file nobody else sees. Only a lock on the file at `path` counts.
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            return fd
        os.close(fd)
    raise PipeError(f"{path}: could not take the store's claim (it keeps changing hands); re-run")


def _release(path: Path, fd: int) -> None:
    """Remove the claim file while still holding its lock, then unlock: a process waiting on the old file sees that it
    is gone (inode check above) and starts over."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _owner(fd: int) -> str:
    """'PID 123 on host h (since ...)' from the claim file the holder wrote just after locking it."""
    deadline = time.monotonic() + OWNER_WAIT_S
    while True:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            record = json.loads(os.read(fd, 4096).decode("utf-8"))
            return f"PID {int(record['pid'])} on host {record['host']} (since {record['since']})"
        except (ValueError, KeyError, TypeError, OSError):
            if time.monotonic() > deadline:
                return "another process (its claim file names no PID)"
            time.sleep(0.01)
