"""Where a store lives: a local folder (`pathlib.Path`) or an object-store URL (`Remote`), decided in one place.

`location(text)` is the only function that turns a `--features`, `--shards` or store argument into a place: a
`scheme://...` string is a URL (never a folder named `s3:`), `file://` is a local path, anything else a local path.
A URL whose scheme has no installed fsspec backend is a one-line error naming the extra to install.

Credentials and endpoints come from where the backend looks for them (for S3: the AWS_* environment variables,
AWS_ENDPOINT_URL included, and ~/.aws/config and credentials), plus `--storage-option KEY=VALUE`, kept in this
process only (`set_storage_options`): they are never written into a store's attributes or a run's run.json, since a
URL's `str()` carries none of them. Dask workers get them with each task (extract/distributed.py).
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import traceback
from pathlib import Path
from typing import Any

from .errors import PipeError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
# scheme -> the extra of pipe-align that installs its fsspec backend (docs/store.md "Remote stores")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}

_storage_options: dict[str, Any] = {}


def set_storage_options(options: dict[str, Any]) -> None:
    """Options passed to every fsspec file system this process opens (`--storage-option KEY=VALUE`)."""
    _storage_options.clear()
    _storage_options.update(options)


def storage_options() -> dict[str, Any]:
    return dict(_storage_options)


def is_url(text: object) -> bool:
    """Whether `text` names a remote place (`scheme://...` other than file://)."""
    if isinstance(text, Remote):
        return True
    m = _URL.match(str(text)) if isinstance(text, str) else None
    return m is not None and m.group(1).lower() != "file"


def location(place: str | Path | Remote) -> Path | Remote:
    """A local Path or a Remote URL for a store or features argument; `file://` URLs are local paths."""
    if isinstance(place, (Path, Remote)):
        return place
    text = str(place)
    m = _URL.match(text)
    if m is None:
        return Path(text)
    if m.group(1).lower() == "file":
        return Path(m.group(2) or "/")
    return Remote(text)


def check_backend(scheme: str, url: str) -> None:
    """One line naming the extra (or package) to install when fsspec has no backend for `scheme`."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        extra = EXTRAS.get(scheme)
        how = f"pip install 'pipe-align[{extra}]'" if extra else f"install the fsspec backend for {scheme}://"
        raise PipeError(f"{url}: no storage backend for {scheme}:// is installed; {how}") from None
    except ValueError:
        raise PipeError(f"{url}: {scheme}:// is not a storage scheme fsspec knows") from None


BACKENDS = ("s3fs", "aiobotocore", "botocore", "aiohttp", "gcsfs", "adlfs", "fsspec")


def storage_failure(e: BaseException) -> str | None:
    """One line for an exception raised inside an object-store backend (no such bucket, no connection, access
    denied), or None when it did not come from there (a bug keeps its traceback)."""
    module = type(e).__module__.split(".")[0]
    frames = traceback.extract_tb(e.__traceback__)
    if module not in BACKENDS and not any(f"/{b}/" in f.filename for f in frames for b in BACKENDS[:-1]):
        return None
    text = (str(e).splitlines() or [""])[0][:300]
    return (
        f"object storage: {type(e).__name__}: {text}; check the URL, the credentials and AWS_ENDPOINT_URL or "
        "--storage-option endpoint_url=... (docs/store.md, Remote stores)"
    )


class Remote:
    """A place on object storage, with the part of pathlib.Path's surface the store code uses (joining, names,
    existence, listing). Immutable; its text is the URL, without credentials."""

    __slots__ = ("scheme", "key")

    def __init__(self, url: str) -> None:
        m = _URL.match(url)
        if m is None:
            raise ValueError(f"not a URL: {url!r}")
        scheme, key = m.group(1).lower(), m.group(2).strip("/")
        if not key:
            raise PipeError(f"{url}: names no bucket or container")
        check_backend(scheme, url)
        self.scheme, self.key = scheme, posixpath.normpath(key)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"Remote({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and str(self) == str(other)

    def __lt__(self, other: Remote) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part: str) -> Remote:
        return Remote(f"{self}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> Remote:
        head = posixpath.dirname(self.key)
        return Remote(f"{self.scheme}://{head}") if head else self

    def with_name(self, name: str) -> Remote:
        return self.parent / name

    def resolve(self) -> Remote:
        return self

    def is_absolute(self) -> bool:
        return True

    # -- the file system ------------------------------------------------------------------------------------------
    @property
    def fs(self):
        """The fsspec file system (one per scheme and options, cached by fsspec), listings never cached: a store that
        another process (a dask worker) has just written is seen as it is now."""
        import fsspec

        opts = {"use_listings_cache": False} | storage_options()
        return fsspec.filesystem(self.scheme, **opts)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.key)) or self.is_dir()

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        """A prefix holding at least one object (object stores have no empty folders)."""
        return bool(self.fs.ls(self.key, detail=False)) if self.fs.isdir(self.key) else False

    def read_text(self) -> str:
        try:
            return self.fs.cat_file(self.key).decode("utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such object", str(self)) from None

    def glob(self, pattern: str) -> list[Remote]:
        """Direct children whose name matches `pattern` (only one level, as Path.glob with a plain pattern)."""
        if not self.fs.isdir(self.key):
            return []
        names = {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.key, detail=False)}
        return [self / n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern)]

    def du(self) -> int:
        """Bytes of every object under this prefix."""
        return int(self.fs.du(self.key, total=True)) if self.fs.isdir(self.key) else 0

    def zarr_store(self, read_only: bool = False):
        """A zarr FsspecStore rooted here (async file system, the same storage options)."""
        from zarr.storage import FsspecStore

        opts = {"use_listings_cache": False} | storage_options()
        return FsspecStore.from_url(str(self), storage_options=opts, read_only=read_only)
