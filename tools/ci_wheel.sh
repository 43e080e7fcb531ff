#!/usr/bin/env bash
# CI: what a user installing the release gets. Builds the sdist and, from the sdist alone, the wheel
# (so the sdist must carry csrc/), checks the wheel ships the CUDA sources, the trained weights and
# py.typed, installs it into a fresh venv that sees this machine's torch (--system-site-packages: the
# installed torch must be kept, never replaced), and from outside the repository runs a few ops and the
# demo (its pictures written), with the package imported from the venv. Last, the first-use CUDA
# build's compile check (nvcc, no GPU) from the installed package's own sources.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

"$PY" -m pip install --quiet build
"$PY" -m build --sdist --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
SDIST="$(ls "$OUT"/dist/*.tar.gz)"
"$PY" -m pip wheel --quiet --no-deps -w "$OUT/dist" "$SDIST"
WHEEL="$(ls "$OUT"/dist/*.whl)"
echo "ci_wheel: built $(basename "$SDIST") and, from it, $(basename "$WHEEL")"
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = {"swiftvlm_kernels/py.typed", "swiftvlm_kernels/apps/weights/tiny-vqa/model.safetensors",
        "swiftvlm_kernels/apps/weights/tiny-vqa/config.json", "swiftvlm_kernels/apps/weights/tiny-vqa/vocab.json",
        "swiftvlm_kernels/apps/weights/tiny-vqa/train.json", "swiftvlm_kernels/apps/weights/tiny-vqa/prompt.json",
        "swiftvlm_kernels/apps/weights/tiny-vqa/alvts-selector/selector.json",
        "swiftvlm_kernels/apps/weights/tiny-vqa/alvts-selector/selector.safetensors",
        "swiftvlm_kernels/__main__.py", "swiftvlm_kernels/apps/cli.py", "swiftvlm_kernels/apps/evaluation/__init__.py",
        "swiftvlm_kernels/csrc/torch_bindings.cpp", "swiftvlm_kernels/csrc/tv_score.cu",
        "swiftvlm_kernels/csrc/score_select.cu", "swiftvlm_kernels/csrc/common.cuh", "swiftvlm_kernels/csrc/launch.h",
        "swiftvlm_kernels/_build.py", "python_ref/tv_score.py"}
missing = need - names
assert not missing, f"the wheel lacks {sorted(missing)}"
assert not any(n.endswith((".so", ".o")) for n in names), "a pure wheel carries no binaries"
print(f"ci_wheel: the wheel has {len(names)} files, the CUDA sources, the trained weights and py.typed among them")
PYEOF

"$PY" -m venv --system-site-packages "$OUT/venv"
VPY="$OUT/venv/bin/python"
"$VPY" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"
"$VPY" -m pip install --quiet "$WHEEL"  # its dependencies: all already present, nothing replaced
if ls "$OUT"/venv/lib/python*/site-packages | grep -qx torch; then
    echo "ci_wheel: installing the wheel put a torch into the venv (it must keep the installed one)"; exit 1
fi
cd "$OUT"
"$VPY" - "$OUT/venv" <<'PYEOF'
import sys, torch
import swiftvlm_kernels
assert swiftvlm_kernels.__file__.startswith(sys.argv[1]), f"imported {swiftvlm_kernels.__file__}, not the venv's"
from swiftvlm_kernels import _build
assert str(_build.source_dir()).startswith(sys.argv[1]), _build.source_dir()
q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 30, 8)
keep, rest, scores = torch.ops.swiftvlm.score_select(q, k, torch.tensor([3, 5]), 20, 6, 0.35)
merged, group, counts = torch.ops.swiftvlm.group_merge(torch.randn(2, 14, 16), 3)
assert keep.shape == (2, 6) and rest.shape == (2, 14) and merged.shape == (2, 3, 16)
print(f"ci_wheel: ops ran from {swiftvlm_kernels.__file__} (torch {torch.__version__})")
PYEOF
"$VPY" -m swiftvlm_kernels --out "$OUT/pictures" >"$OUT/demo.log" 2>&1 || { cat "$OUT/demo.log"; exit 1; }
tail -n 3 "$OUT/demo.log"
for m in vanilla swiftvlm fastv pdrop; do
    test -s "$OUT/pictures/$m.png" || { echo "ci_wheel: the demo wrote no $m.png"; exit 1; }
done
"$VPY" -m swiftvlm_kernels._build --check
echo "ci_wheel: OK"
