#!/usr/bin/env bash
# The GPU check of the kernel backends, in one run of under 10 minutes on a GPU machine:
#   build the CUDA extension, run the CUDA tests, time every op on every backend at LLaVA-1.5-7B
#   shapes (with each backend's difference from python_ref), and run every cuda op once under
#   compute-sanitizer memcheck and racecheck.
#   bash bench/gpu_check.sh [DIR]     default DIR: $OUT, else bench/results/gpu_check
# Exits non-zero when the build, the tests or a sanitizer fails.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
gpu_begin "${1:-${OUT:-$ROOT/bench/results/gpu_check}}"
gpu_build
gpu_tests 200
step "quick timings" 120 timings.txt nonfatal \
    "$PYTHON" -m bench.ops --models llava-1.5-7b --batch 1 --json "$DEST/timings.json"
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        # caching allocator off, so memcheck sees each tensor's own bounds
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "compute-sanitizer $tool" 60 "sanitizer-$tool.log" fatal \
            compute-sanitizer --tool "$tool" --error-exitcode 9 \
            "$PYTHON" -m bench.ops --once --providers cuda --models llava-1.5-7b --batch 1
    done
else
    note "compute-sanitizer: not installed, skipped"
fi
gpu_end
