#!/usr/bin/env bash
# Compile-checks every csrc/*.cu (nvcc, every arch of swiftvlm_kernels/_build.py) and csrc/*.cpp (the
# host compiler) with exactly the flags of the first-use (JIT) build, warnings as errors, against the
# installed torch's headers (a CPU wheel is enough: only the stable-ABI headers are used). No GPU
# needed; nothing is linked. One line per file, then the compiler output of each failure.
#
#   tools/check_cuda_compile.sh            # JOBS=2 in parallel
#   JOBS=4 CUDA_HOME=/usr/local/cuda PYTHON=python3 tools/check_cuda_compile.sh
#
# Exits 1 if any file fails, 2 if nvcc is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" -m swiftvlm_kernels._build --check --jobs "${JOBS:-2}"
