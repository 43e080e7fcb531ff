"""Packaging: one place holds the CUDA arch list and the stable-ABI target (swiftvlm_kernels/_build.py),
which the first-use build, setup.py, CMakeLists.txt and the compile check all use; the first-use
build's errors on a machine that cannot build; the typed-package marker. (Building and installing
the wheel in a fresh venv is tools/ci_wheel.sh, run by CI.)"""
import re
from pathlib import Path

import pytest
import torch

from swiftvlm_kernels import _build, cuda_backend

ROOT = Path(__file__).resolve().parents[1]


def test_one_place_for_archs_and_abi():
    assert _build.archs() == list(_build.CUDA_ARCHS)
    flags = _build.nvcc_flags()
    for a in _build.CUDA_ARCHS:
        assert f"arch=compute_{a},code=sm_{a}" in flags
    assert f"-DTORCH_TARGET_VERSION={_build.TORCH_TARGET_VERSION}" in flags
    assert f"-DTORCH_TARGET_VERSION={_build.TORCH_TARGET_VERSION}" in _build.cxx_flags()
    # nobody else spells them out: setup.py takes the flags from _build, CMake parses its two lines
    for name in ("setup.py", "CMakeLists.txt", "tools/check_cuda_compile.sh", "tests/cuda_emulator.py",
                 "bench/static_report.py"):
        text = (ROOT / name).read_text()
        assert _build.TORCH_TARGET_VERSION not in text, name
        if name != "bench/static_report.py":  # the report reads H100 (sm_90a) PTX on purpose
            assert "compute_90a" not in text and '"80;90a"' not in text, name
    cmake = (ROOT / "CMakeLists.txt").read_text()
    line = next(l for l in (ROOT / "swiftvlm_kernels/_build.py").read_text().splitlines() if l.startswith("CUDA_ARCHS = "))
    assert re.findall(r'"([0-9]+a?)"', line) == list(_build.CUDA_ARCHS)  # what CMake's regex reads
    assert 'REGEX "^CUDA_ARCHS = "' in cmake and 'REGEX "^TORCH_TARGET_VERSION = "' in cmake


def test_sources_and_typed_marker():
    names = [f.name for f in _build.sources()]
    assert "torch_bindings.cpp" in names and "tv_score.cu" in names
    assert (ROOT / "swiftvlm_kernels" / "py.typed").is_file()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()


def test_bad_arch_list(monkeypatch):
    monkeypatch.setenv("SWIFTVLM_CUDA_ARCHS", "80;sm90")
    with pytest.raises(ValueError, match="^SWIFTVLM_CUDA_ARCHS"):
        _build.archs()
    monkeypatch.setenv("SWIFTVLM_CUDA_ARCHS", "86;90a")
    assert _build.archs() == ["86", "90a"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch refusal")
def test_first_use_build_refuses_a_cpu_torch_clearly():
    with pytest.raises(RuntimeError, match="CUDA build of torch"):
        _build.load()
    assert not cuda_backend.available() and "no CUDA" in cuda_backend.reason
    with pytest.raises(RuntimeError, match="swiftvlm cuda backend: this torch has no CUDA"):
        cuda_backend.tv_score(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), 1, 1.0)


def test_print_shows_the_jit_commands(capsys):
    assert _build.main(["--print"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(_build.sources())
    assert all(f"-DTORCH_TARGET_VERSION={_build.TORCH_TARGET_VERSION}" in line for line in out)


def test_public_wrappers_are_typed_and_documented():
    import inspect

    from swiftvlm_kernels import distributed, ops

    wrappers = [getattr(ops, n) for n in ("tv_score", "topk_select", "score_select", "group_merge", "bypass_align",
                                          "bypass_align_into", "compact", "restore", "tv_score_varlen",
                                          "score_select_varlen")]
    wrappers += [distributed.tp_tv_score, distributed.tp_score_select, distributed.shard_heads]
    for fn in wrappers:
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()
                   if p.name != "process_group"), fn.__name__
        for section in ("Parameters", "Returns", "Raises"):
            assert section in (fn.__doc__ or ""), (fn.__name__, section)
