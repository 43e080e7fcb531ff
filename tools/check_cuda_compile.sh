#!/usr/bin/env bash
# Compile-checks every csrc/*.cu and csrc/*.cpp with nvcc for sm_80 and sm_90a against the installed
# torch's headers (a CPU wheel is enough: only the stable-ABI headers are used), targeting torch
# 2.10's stable ABI, with every warning an error. No GPU needed; nothing is linked.
#
#   tools/check_cuda_compile.sh            # all files, JOBS=2 in parallel
#   JOBS=4 NVCC=/usr/local/cuda/bin/nvcc PYTHON=python3 tools/check_cuda_compile.sh
#
# Prints one line per file (OK / FAIL and seconds), then the compiler output of every failure.
# Exits 1 if any file fails, 2 if the tools are missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
JOBS="${JOBS:-2}"

command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: nvcc not found (set NVCC)"; exit 2; }
TORCH_INCLUDES="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')" \
  || { echo "check_cuda_compile: cannot import torch with $PYTHON (set PYTHON)"; exit 2; }

LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT

# Flags shared by every compile: the ones setup.py passes, plus warnings as errors on both sides.
COMMON=(-std=c++17 -O3 --expt-relaxed-constexpr -DTORCH_TARGET_VERSION=0x020a000000000000
        -I"$ROOT/csrc" $TORCH_INCLUDES -Werror all-warnings -Xcompiler -Wall,-Werror)
ARCHS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a)

# compile FILE: one line of result; the compiler output goes to $LOGS/<name>.log.
compile() {
  local file="$1" name log start status=0
  name="$(basename "$file")"
  log="$LOGS/$name.log"
  start=$SECONDS
  {
    # As CUDA for both architectures (what setup.py does for .cu; -x cu also for the bindings).
    "$NVCC" -x cu -c "${COMMON[@]}" "${ARCHS[@]}" "$file" -o "$LOGS/$name.cu.o" || status=1
    # The bindings are built by the host compiler in setup.py: check that route too.
    if [[ "$file" == *.cpp ]]; then
      "$NVCC" -c "${COMMON[@]}" "$file" -o "$LOGS/$name.host.o" || status=1
    fi
  } >"$log" 2>&1
  if [[ $status -eq 0 ]]; then
    printf 'OK   %-32s sm_80 sm_90a  %3ds\n' "csrc/$name" $((SECONDS - start))
  else
    printf 'FAIL %-32s sm_80 sm_90a  %3ds\n' "csrc/$name" $((SECONDS - start))
    touch "$LOGS/$name.failed"
  fi
}
mapfile -t FILES < <(cd "$ROOT" && ls csrc/*.cu csrc/*.cpp 2>/dev/null | sort)
[[ ${#FILES[@]} -gt 0 ]] || { echo "check_cuda_compile: no csrc/*.cu or csrc/*.cpp files"; exit 1; }

for file in "${FILES[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; done
  compile "$ROOT/$file" &
done
wait

failed=0
for f in "$LOGS"/*.failed; do
  [[ -e "$f" ]] || continue
  failed=1
  name="$(basename "$f" .failed)"
  echo "---- csrc/$name"
  cat "$LOGS/$name.log"
done
exit $failed
