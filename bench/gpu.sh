#!/usr/bin/env bash
# The GPU check: one table (docs/gpu.md). Needs no network.
#   bash bench/gpu.sh            on a CUDA machine, under 8 minutes on one H200
#   bash bench/gpu.sh --tiny     the same code on CPU with tiny sizes (CI checks that it runs), about a minute
# PYTHON overrides the interpreter (default: .venv/bin/python of this checkout, else python3). On a bare machine whose
# python cannot import pipe_align (torch only, no pip), the wheels in .whl/ (bench/gpu_wheels.sh) are installed into
# /tmp/pipe-site and the package folders are linked there as pipe_align.*, without building anything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import pipe_align.extract.store" 2>/dev/null; then
  site=/tmp/pipe-site
  mkdir -p "$site/pipe_align"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  fi
  for pkg in extract align evaluate pipelines; do ln -sfn "$PWD/$pkg" "$site/pipe_align/$pkg"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import pipe_align.extract.store" || { echo "bench/gpu.sh: cannot import pipe_align (run bench/gpu_wheels.sh where pip works, carry .whl)" >&2; exit 1; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
if [[ " $* " == *" --tiny "* ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec "$PY" bench/gpu_check.py "$@"
