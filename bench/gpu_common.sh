# Shared steps of bench/gpu_check.sh and bench/gpu_report.sh (sourced, not run). The GPU machine has
# no network: torch with CUDA, triton, nvcc and the test packages are already installed there.
# Usage: gpu_begin DIR; gpu_build; gpu_tests; ...; gpu_end   (gpu_end exits with the status)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || echo python3)}"
export PYTHONUNBUFFERED=1

gpu_begin() {  # DIR: the one output folder; records the environment
    DEST="$1"
    mkdir -p "$DEST" && DEST="$(cd "$DEST" && pwd)"
    cd "$ROOT" || exit 1
    status=0
    : >"$DEST/summary.txt"
    {
        nvidia-smi
        "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
        nvcc --version
        echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    } >"$DEST/env.txt" 2>&1
}

note() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$DEST/summary.txt"; }

step() {  # NAME LIMIT_S LOG FATAL CMD...: run CMD with a time limit, log it, record failure
    local name=$1 limit=$2 log=$3 fatal=$4 start=$SECONDS rc
    shift 4
    timeout "$limit" "$@" >"$DEST/$log" 2>&1
    rc=$?
    note "$name: rc=$rc in $((SECONDS - start))s ($log: $(tail -n 1 "$DEST/$log"))"
    if [[ $rc -ne 0 && $fatal == fatal ]]; then status=1; fi
    return $rc
}

gpu_build() {  # the CUDA extension in place, for this GPU's architecture only (sm_90 -> 90a)
    local arch
    arch="$("$PYTHON" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")"
    SWIFTVLM_CUDA_ARCHS="${SWIFTVLM_CUDA_ARCHS:-$arch}" MAX_JOBS="${MAX_JOBS:-16}" \
        step "build sm_$arch" 150 build.log fatal "$PYTHON" setup.py build_ext --inplace
    note "$("$PYTHON" -c "import swiftvlm_kernels.cuda_backend as c; print('cuda backend available:', c.available(), c.reason)" 2>&1 | tail -n 1)"
}

gpu_tests() {  # every CUDA-marked test: the triton and cuda backends and the model against python_ref
    step "tests (pytest -m cuda)" "${1:-200}" tests.log fatal \
        "$PYTHON" -m pytest tests -m cuda --tier full -q -rs -p no:cacheprovider --junitxml="$DEST/pytest.xml"
}

gpu_end() {
    note "$(basename "$0"): $([[ $status -eq 0 ]] && echo PASS || echo FAIL) (results in $DEST)"
    exit $status
}
