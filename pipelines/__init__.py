"""The `pipe` command, the demo, and the Python API: `from pipe_align.pipelines import load` (pipelines/api.py).

`load` is re-exported lazily, so that importing the CLI or the demo does not pay for the API's imports. Importing this
package first sets the OpenMP thread policy (pipelines/threads.py), before anything below loads torch."""

from __future__ import annotations

from typing import Any

from . import threads as _threads

_threads.configure()

__all__ = ["AlignedModel", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
