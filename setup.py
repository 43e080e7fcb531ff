"""Build script: a pure-Python package that carries the CUDA sources; the kernels compile on first use.

`pip install .` (build isolation is fine: torch is not a build requirement) gives a py3-none-any
wheel with the Python packages and csrc/ copied into swiftvlm_kernels/csrc/; the cuda backend then
compiles it with ninja on its first call (swiftvlm_kernels/_build.py: the one place of the arch list
and the stable-ABI target). Environment:
  SWIFTVLM_BUILD_CUDA=1   also build the extension ahead of time (needs a CUDA torch >= 2.10 and nvcc
                          in the build environment: use --no-build-isolation); the wheel is then
                          platform-specific
  SWIFTVLM_CUDA_ARCHS     semicolon list of SM targets (default: _build.CUDA_ARCHS)
"""
import glob
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("*.cu", "*.cuh", "*.cpp", "*.h")


def _build_config():
    """swiftvlm_kernels/_build.py loaded on its own (the package's __init__ imports torch)."""
    spec = importlib.util.spec_from_file_location("_swiftvlm_build", os.path.join(HERE, "swiftvlm_kernels", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithSources(build_py):
    """build_py that copies the top-level csrc/ into the package (swiftvlm_kernels/csrc/)."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "csrc")
        dst = os.path.join(self.build_lib, "swiftvlm_kernels", "csrc")
        files = sorted(f for pattern in SOURCES for f in glob.glob(os.path.join(src, pattern)))
        if not files:
            raise RuntimeError("setup.py: csrc/ has no CUDA sources to ship (an sdist must include csrc/)")
        os.makedirs(dst, exist_ok=True)
        for f in files:
            shutil.copy2(f, dst)


def _ahead_of_time():
    """([ext], cmdclass) when SWIFTVLM_BUILD_CUDA=1, else ([], {})."""
    if os.environ.get("SWIFTVLM_BUILD_CUDA") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cfg = _build_config()
    if torch.version.cuda is None:
        raise RuntimeError("SWIFTVLM_BUILD_CUDA=1: the torch in the build environment has no CUDA "
                           "(build with --no-build-isolation next to a CUDA torch >= 2.10)")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(name="swiftvlm_kernels._C", sources=sources, include_dirs=[os.path.join(HERE, "csrc")],
                        extra_compile_args={"cxx": cfg.cxx_flags(), "nvcc": cfg.nvcc_flags()}, py_limited_api=True)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ahead_of_time()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
