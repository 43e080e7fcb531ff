#!/usr/bin/env bash
# README Quickstart, command 2: set up (if needed) and run the test suite.
# Without a GPU, Triton kernels run on CPU tensors through TRITON_INTERPRET=1 (tests/conftest.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
