#!/usr/bin/env bash
# README Quickstart, command 2: set up (if needed) and run the test suite's fast tier (docs/testing.md).
# Arguments go to pytest: `bash tools/test.sh --tier full` runs every test, `--tier rest` what the fast
# tier leaves out. Without a GPU, Triton kernels run on CPU tensors through TRITON_INTERPRET=1
# (tests/conftest.py) and the CUDA kernels on the CPU emulation (tests/cuda_emulator.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
