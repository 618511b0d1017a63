"""The `pipe` command, the demo, and the Python API: `from pipe_align.pipelines import load` (pipelines/api.py).

`load` is re-exported lazily, so that importing the CLI or the demo does not pay for the API's imports."""

from __future__ import annotations

from typing import Any

__all__ = ["AlignedModel", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipe_align.pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
