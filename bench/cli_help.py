"""Wall time of `pipe --help` and of each command's `--help` (fresh processes, median of N), and which heavy modules
each one imports. `--baseline DIR` times another checkout in the same run (DIR holds its extract/ align/ evaluate/
pipelines/ folders), for a before/after ratio on the same machine at the same moment.

    python bench/cli_help.py --reps 5 --baseline /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELPS = (["--help"], ["align", "--help"], ["eval", "segmentation", "--help"], ["extract", "--help"])
HEAVY = ("torch", "zarr", "matplotlib", "transformers")
PROBE = (
    "import json, sys\nfrom pipe_align.pipelines.cli import main\nmain({argv!r})\n"
    "print(json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)"
)


def site_for(checkout: Path) -> str:
    """A folder whose pipe_align.* links to the checkout's package folders (no install needed)."""
    site = Path(tempfile.mkdtemp(prefix="pipe-help-bench-"))
    (site / "pipe_align").mkdir()
    for pkg in ("extract", "align", "evaluate", "pipelines"):
        (site / "pipe_align" / pkg).symlink_to(checkout.resolve() / pkg)
    return str(site)


def time_help(argv: list[str], reps: int, pythonpath: str | None) -> tuple[float, list[str]]:
    env = {**os.environ, "COLUMNS": "120"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = PROBE.format(argv=argv, heavy=HEAVY)
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)  # warm caches, spec
    times, heavy = [], []
    for _ in range(reps):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - start)
        heavy = json.loads(done.stderr.strip().splitlines()[-1])
    return statistics.median(times), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to time in the same run")
    args = parser.parse_args()
    variants = [("this checkout", None)]
    if args.baseline:
        variants.append(("baseline", site_for(args.baseline)))
    print(f"{'command':32s} {'variant':14s} {'median s':>9s}  heavy modules imported")
    for argv in HELPS:
        for name, path in variants:
            seconds, heavy = time_help(argv, args.reps, path)
            print(f"{'pipe ' + ' '.join(argv):32s} {name:14s} {seconds:9.3f}  {', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
