#!/usr/bin/env bash
# The whole GPU report in one command (fits one 10-minute run on an H100/H200):
#   build the CUDA extension, run the test suite on CUDA, run the kernel microbenchmarks and the
#   end-to-end prefill benchmark, and write JSON, markdown and PNG plots under one folder.
#
#   bash bench/gpu_report.sh [OUT_DIR]      default: bench/results/<gpu-name>-<commit>
#   SMOKE=1 bash bench/gpu_report.sh DIR    the same pipeline on tiny shapes (CPU), to check the script
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
OUT_DIR=${1:-bench/results/${gpu}-${commit}}
mkdir -p "$OUT_DIR"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/run.log"; }
status=0

log "build: commit $commit on $gpu"
if [ "${SMOKE:-0}" != 1 ]; then
    timeout 150 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1 \
        || { log "build FAILED (see build.log)"; status=1; }
    "$PY" -c "from swiftvlm_kernels import cuda_backend as c; print('cuda backend available:', c.available(), c.reason or '')" \
        2>&1 | tee -a "$OUT_DIR/run.log"
fi

if [ "${SMOKE:-0}" = 1 ]; then
    tests="tests/test_bench.py"; models="smoke"; batches="1"; prefill="--smoke"
else
    tests="tests"; models="llava-1.5-7b llava-next-7b qwen2-vl-7b video-16k"; batches="1 8"; prefill=""
fi

log "tests: pytest $tests"
timeout 210 "$PY" -m pytest $tests -q -x -p no:cacheprovider --benchmark-disable >"$OUT_DIR/tests.log" 2>&1 \
    || { log "tests FAILED (see tests.log)"; status=1; }
tail -n 3 "$OUT_DIR/tests.log" | tee -a "$OUT_DIR/run.log"

log "kernel microbenchmarks"
timeout 120 "$PY" -m swiftvlm_kernels bench --models $models --batch $batches --json "$OUT_DIR/ops.json" \
    >"$OUT_DIR/ops.log" 2>&1 || { log "microbenchmarks FAILED (see ops.log)"; status=1; }

log "end-to-end prefill"
timeout 90 "$PY" -m bench.bench_prefill $prefill --json "$OUT_DIR/prefill.json" >"$OUT_DIR/prefill.log" 2>&1 \
    || { log "prefill benchmark FAILED (see prefill.log)"; status=1; }

log "report"
"$PY" bench/report.py "$OUT_DIR" >/dev/null 2>"$OUT_DIR/report.err" || { log "report FAILED"; status=1; }
log "done: $OUT_DIR/report.md (status $status)"
exit $status
