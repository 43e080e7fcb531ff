#!/usr/bin/env bash
# The whole GPU report in one command (one 10-minute run on an H100/H200; step limits sum to 590 s): build the CUDA extension,
# run the CUDA tests, run the kernel microbenchmarks at every model shape and the end-to-end prefill
# benchmark, and write JSON, markdown (report.md, with the goals and the measured `auto` table) and
# PNG plots under one folder.
#   bash bench/gpu_report.sh [DIR]      default DIR: bench/results/<gpu>-<commit>
#   SMOKE=1 bash bench/gpu_report.sh D  the same pipeline on tiny shapes on a CPU, to check the script
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
gpu=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
gpu_begin "${1:-$ROOT/bench/results/${gpu}-${commit}}"
if [[ "${SMOKE:-0}" == 1 ]]; then
    step "tests (smoke)" 200 tests.log fatal "$PYTHON" -m pytest tests/test_bench.py -q -p no:cacheprovider
    models="smoke"; batches="1"; prefill="--model smoke --budgets 12 10 --rounds 2"
else
    gpu_build
    gpu_tests 180
    models="llava-1.5-7b llava-next-7b qwen2-vl-7b video-16k"; batches="1 8"; prefill="--model llava-1.5-7b --batch 1 8"
fi
step "kernel microbenchmarks" 130 ops.log fatal \
    "$PYTHON" -m bench.ops --models $models --batch $batches --json "$DEST/ops.json"
step "end-to-end prefill" 100 prefill.log fatal "$PYTHON" -m bench.prefill $prefill --json "$DEST/prefill.json"
step "report" 30 report.log fatal "$PYTHON" -m bench.report "$DEST"
gpu_end
