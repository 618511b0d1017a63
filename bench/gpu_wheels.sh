#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, triton, transformers, typer, rich, pytest, pillow, numpy but no
# zarr stack and no network), downloaded HERE into .whl/ (git-ignored via .git/info/exclude) for Python 3.12 x86-64;
# `bash bench/gpu.sh` installs them on a bare machine. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PY="${PYTHON:-python3}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1
ls -la .whl
