"""Build script: the Python packages always; the CUDA extension only when torch has CUDA.

Install with `pip install -e . --no-build-isolation` (torch is not a build requirement, so the
installed torch is used and never replaced). Environment:
  SWIFTVLM_CUDA_ARCHS   semicolon list of SM targets, default "80;90a"
  SWIFTVLM_NO_CUDA=1    skip the CUDA extension even when torch has CUDA
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension():
    """Return ([ext], cmdclass) when the CUDA extension can be built, else ([], {})."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("swiftvlm-kernels: torch is not installed; building without the CUDA extension")
        return [], {}
    if os.environ.get("SWIFTVLM_NO_CUDA") == "1":
        print("swiftvlm-kernels: SWIFTVLM_NO_CUDA=1; building without the CUDA extension")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("swiftvlm-kernels: torch has no CUDA; building without the CUDA extension "
              "(the torch and triton backends are available)")
        return [], {}

    archs = [a.strip() for a in os.environ.get("SWIFTVLM_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # Target torch 2.10's stable ABI so one build serves torch 2.10 and later.
    target = ["-DTORCH_TARGET_VERSION=0x020a000000000000"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        name="swiftvlm_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"] + target,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + gencode + target,
        },
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
