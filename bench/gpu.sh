#!/usr/bin/env bash
# The prepared GPU check of issue 14: one table (docs/gpu.md). Needs no network.
#   bash bench/gpu.sh            on a CUDA machine, under 8 minutes on one H200
#   bash bench/gpu.sh --tiny     the same code on CPU with tiny sizes (CI checks that it runs), about a minute
# PYTHON overrides the interpreter (default: .venv/bin/python of this checkout, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
if [[ " $* " == *" --tiny "* ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec "$PY" bench/gpu_check.py "$@"
