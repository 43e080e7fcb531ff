#!/usr/bin/env bash
# The two ends of the supported dependency ranges, each in a fresh virtual environment (python3 -m venv:
# nothing from this machine's site-packages), with this package installed from the checkout:
#
#   bash tools/matrix.sh newest   # the newest torch, triton and transformers the package index serves
#   bash tools/matrix.sh oldest   # the oldest supported release of each: the floors pyproject.toml declares
#
# In each: the op, engine, model and transformers tests of the fast tier (the kernel-only files run in
# the main environment; the `oldest` end adds the Triton backend tests and the Triton compile check
# under its triton). A release that breaks the library fails the next run: `newest` resolves again
# every time (the PyPI wheel of torch is a CUDA build; it runs the CPU tests all the same).
# MATRIX_VENV_DIR (default build/) holds the environments; an existing one is updated in place.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
END=${1:?usage: bash tools/matrix.sh newest|oldest}
PY=${PYTHON:-python3}
VENV="${MATRIX_VENV_DIR:-build}/venv-$END"

# floors: the ">=" bounds of torch, triton and transformers in pyproject.toml (one place)
read -r TORCH_MIN TRITON_MIN TRANSFORMERS_MIN < <("$PY" - <<'EOF'
import re
text = open("pyproject.toml").read()
print(*(re.search(rf'"{name}>=([0-9.]+)', text).group(1) for name in ("torch", "triton", "transformers")))
EOF
)

case "$END" in
    newest)
        # no pins, and none from the machine's pip configuration (it caps torch at the releases on its disk)
        PINS=(--upgrade --upgrade-strategy eager torch triton transformers)
        export PIP_CONSTRAINT=/dev/null ;;
    oldest)
        # numpy < 2.3: triton 3.6's interpreter int()s one-element arrays, which numpy 2.3 refuses
        PINS=("torch==$TORCH_MIN" "triton==$TRITON_MIN" "transformers==$TRANSFORMERS_MIN" "numpy<2.3") ;;
    *) echo "usage: bash tools/matrix.sh newest|oldest" >&2; exit 2 ;;
esac

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
start=$SECONDS
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]" "${PINS[@]}" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
# what the end resolved to (the oldest must be exactly the floors)
"$VENV/bin/python" - "$END" "$TORCH_MIN" "$TRITON_MIN" "$TRANSFORMERS_MIN" <<'EOF'
import sys
import torch, triton, transformers
end, floors = sys.argv[1], sys.argv[2:]
got = [torch.__version__.split("+")[0], triton.__version__, transformers.__version__]
print(f"matrix {end}: torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
      f"python {sys.version.split()[0]}")
def release(v):  # "2.10" and "2.10.0" alike
    parts = [int(x) for x in v.split(".")[:3] if x.isdigit()]
    return tuple(parts + [0] * (3 - len(parts)))
if end == "oldest" and [release(v) for v in got] != [release(v) for v in floors]:
    sys.exit(f"matrix oldest: expected torch {floors[0]}, triton {floors[1]}, transformers {floors[2]}, got {got}")
EOF
echo "matrix $END: set-up took $((SECONDS - start)) s"

# the op layer (opcheck and torch.compile of every op, the backends against the reference), the engine,
# the models and the transformers path: what a torch, triton or transformers release can break
TESTS=(tests/test_ops.py tests/test_backends.py tests/test_ragged.py tests/test_engine.py tests/test_pruning_plan.py
       tests/test_llava.py tests/test_llava_pruning.py tests/test_hf.py tests/test_hf_readme.py tests/test_hf_eval.py
       tests/test_profiling.py tests/test_demo.py)
# the emulated CUDA build goes to its own folder: the environments' torch headers differ from the main one's
export SWIFTVLM_EMU_BUILD="$VENV/cuda_emu"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
if [[ "$END" == oldest ]]; then
    "$VENV/bin/python" tools/check_triton_compile.py
fi
