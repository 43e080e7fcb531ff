#!/usr/bin/env bash
# Idempotent set-up for a fresh CPU machine (sourced by tools/demo.sh and tools/test.sh):
# torch (the pinned CPU build when none is installed; an installed torch >= 2.4 is kept),
# then this package in editable mode with its test extras (a plain pip install: torch is not a build
# requirement, so the installed torch is kept; the CUDA kernels compile on first use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build)"
    "$PY" -m pip install --quiet torch==2.13.0
fi
if ! "$PY" -c "import swiftvlm_kernels, pytest, hypothesis, pytest_benchmark, transformers, triton, mypy, ninja" >/dev/null 2>&1; then
    echo "setup: installing swiftvlm-kernels (editable) with test extras"
    "$PY" -m pip install --quiet -e ".[test]"
fi
