#!/usr/bin/env bash
# Idempotent set-up for a fresh CPU machine (sourced by tools/demo.sh and tools/test.sh):
# torch (the pinned CPU build 2.13.0 when none is installed or the installed one is older than the
# supported floor in pyproject.toml; a supported torch is kept), then this package in editable mode
# with its test extras when anything is missing or older than its floor (a plain pip install: torch is
# not a build requirement, so the installed torch is kept; the CUDA kernels compile on first use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# exit 0: all present at their floors; 3: torch missing or too old; 4: something else missing or too old
check() {
    "$PY" - <<'CHECK' >/dev/null 2>&1
import importlib, re, sys
text = open("pyproject.toml").read()
def old(module, name):
    floor = re.search(rf'"{name}>=([0-9.]+)', text).group(1)
    have = tuple(int(x) for x in re.findall(r"\d+", importlib.import_module(module).__version__)[:2])
    return have < tuple(int(x) for x in floor.split(".")[:2])
try:
    if old("torch", "torch"):
        sys.exit(3)
except ImportError:
    sys.exit(3)
try:
    for module in ("swiftvlm_kernels", "pytest", "hypothesis", "pytest_benchmark", "mypy", "ninja"):
        importlib.import_module(module)
    sys.exit(4 if old("transformers", "transformers") or old("triton", "triton") else 0)
except ImportError:
    sys.exit(4)
CHECK
}
status=0; check || status=$?
if [[ $status == 3 ]]; then
    echo "setup: installing torch 2.13.0 (CPU build)"
    "$PY" -m pip install --quiet torch==2.13.0
    status=0; check || status=$?
fi
if [[ $status != 0 ]]; then
    echo "setup: installing swiftvlm-kernels (editable) with test extras"
    "$PY" -m pip install --quiet -e ".[test]"
fi
