"""The CUDA backend's build, in one place: the arch list, the stable-ABI target, the flags, the
sources, and the first-use (JIT) compile.

Who reads what:
  - setup.py (`SWIFTVLM_BUILD_CUDA=1` builds the extension ahead of time, for platform wheels),
    CMakeLists.txt (parses CUDA_ARCHS and TORCH_TARGET_VERSION from this file) and
    tools/check_cuda_compile.sh (runs `python -m swiftvlm_kernels._build --check`) all take the arch
    list and the ABI target from here;
  - swiftvlm_kernels/cuda_backend.py calls `load()` on the first CUDA call when no prebuilt
    extension is installed: ninja (through torch.utils.cpp_extension) compiles csrc/ into a cache
    directory keyed by the torch version, the CUDA version, the arch list and a hash of the sources,
    printing one line while it builds; later processes load the cached library at once.

The sources: the wheel and the sdist carry csrc/ inside the package (swiftvlm_kernels/csrc/, copied
by setup.py); an editable install reads the repository's top-level csrc/.

`python -m swiftvlm_kernels._build --check` compiles every source with exactly the flags the JIT
uses (nvcc for .cu for every arch, the host compiler for .cpp), compile only: what CI runs on a
machine with nvcc and no GPU (torch's CPU wheel carries the stable-ABI headers).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

# The one arch list and ABI target (CMakeLists.txt parses these two lines: keep them literal).
CUDA_ARCHS = ("80", "90a")
TORCH_TARGET_VERSION = "0x020a000000000000"  # torch 2.10's stable ABI: one build serves 2.10 and later
MIN_TORCH_FOR_CUDA = (2, 10)

HERE = Path(__file__).resolve().parent
EXT_NAME = "swiftvlm_kernels_cuda"

__all__ = ["CUDA_ARCHS", "TORCH_TARGET_VERSION", "archs", "source_dir", "sources", "cxx_flags", "nvcc_flags",
           "cache_dir", "load", "check", "main"]


def archs() -> list[str]:
    """The SM targets: SWIFTVLM_CUDA_ARCHS (a ';' list such as "80;90a") or CUDA_ARCHS.

    Raises
    ------
    ValueError
        an arch that is not digits with an optional letter suffix.
    """
    raw = os.environ.get("SWIFTVLM_CUDA_ARCHS")
    values = list(CUDA_ARCHS) if not raw else [a.strip() for a in raw.split(";") if a.strip()]
    for a in values:
        if not (a[:-1].isdigit() and (a[-1].isdigit() or a[-1] in "af")) or len(a) < 2:
            raise ValueError(f"SWIFTVLM_CUDA_ARCHS: expected a ';' list of SM targets such as 80;90a, got {raw!r}")
    return values


def source_dir() -> Path:
    """csrc/ inside the installed package (wheel, sdist), else the repository's (editable install).

    Raises
    ------
    FileNotFoundError
        neither holds the CUDA sources.
    """
    for candidate in (HERE / "csrc", HERE.parent / "csrc"):
        if (candidate / "torch_bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the CUDA sources (csrc/) are neither in {HERE / 'csrc'} nor in {HERE.parent / 'csrc'}")


def sources(directory: Optional[Path] = None) -> list[Path]:
    """Every .cu and .cpp file of csrc/, sorted (the headers are included by them)."""
    d = directory or source_dir()
    return sorted(list(d.glob("*.cu")) + list(d.glob("*.cpp")))


def gencode(targets: Sequence[str]) -> list[str]:
    return [flag for a in targets for flag in ("-gencode", f"arch=compute_{a},code=sm_{a}")]


def cxx_flags() -> list[str]:
    """Host-compiler flags of the .cpp sources."""
    return ["-O3", "-std=c++17", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]


def nvcc_flags(targets: Optional[Sequence[str]] = None) -> list[str]:
    """nvcc flags of the .cu sources, for `targets` (default: archs())."""
    return (["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
             f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"] + gencode(list(targets or archs())))


def _source_hash(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(list(files) + sorted(files[0].parent.glob("*.cuh")) + sorted(files[0].parent.glob("*.h"))):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    """Where the JIT build lives: SWIFTVLM_CACHE_DIR (default ~/.cache/swiftvlm_kernels), then one
    folder per torch version, CUDA version, arch list and source hash."""
    import torch

    root = Path(os.environ.get("SWIFTVLM_CACHE_DIR") or Path.home() / ".cache" / "swiftvlm_kernels")
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{'_'.join(archs())}-{_source_hash(sources())}"
    return root / key.replace("+", "_")


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _cuda_home() -> Optional[Path]:
    """The CUDA toolkit: torch's CUDA_HOME, $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or nvcc's."""
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    for c in (CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
              Path(found).resolve().parent.parent if found else None):
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    return None


def find_nvcc() -> Optional[str]:
    home = _cuda_home()
    if home and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def load() -> Path:
    """Compile csrc/ on first use (cached) and load it into torch.ops.swiftvlm; returns the library.

    Raises
    ------
    RuntimeError
        torch without CUDA, torch older than 2.10, nvcc missing, or the compile failed (its log).
    """
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError("the cuda backend needs a CUDA build of torch; this torch has no CUDA "
                           "(use the triton or torch backend)")
    if torch_version() < MIN_TORCH_FOR_CUDA:
        raise RuntimeError(f"the cuda backend targets torch's 2.10 stable ABI and needs torch >= 2.10, got "
                           f"{torch.__version__} (use the triton or torch backend, or upgrade torch)")
    if find_nvcc() is None:
        raise RuntimeError("the cuda backend compiles its kernels on first use and needs nvcc: install the CUDA "
                           "toolkit (matching torch's CUDA) or set CUDA_HOME; or use the triton backend")
    files = sources()
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    lib = build / f"{EXT_NAME}.so"
    if not lib.exists():
        print(f"swiftvlm-kernels: compiling the CUDA kernels for sm_{', sm_'.join(archs())} (first use, cached in "
              f"{build}) ...", file=sys.stderr, flush=True)
    cpp_extension.load(name=EXT_NAME, sources=[str(f) for f in files], extra_cflags=cxx_flags(),
                       extra_cuda_cflags=nvcc_flags(), extra_include_paths=[str(files[0].parent)],
                       build_directory=str(build), is_python_module=False, verbose=False)
    return lib


def check(print_only: bool = False, jobs: int = 2, werror: bool = True) -> int:
    """Compile every source with the JIT's flags, compile only (no GPU, no link). Prints one line
    per source; returns the number of failures (the compiler output of each is printed)."""
    from concurrent.futures import ThreadPoolExecutor
    import tempfile
    import torch.utils.cpp_extension as c

    nvcc = find_nvcc() or "nvcc"
    includes = [f"-I{p}" for p in c.include_paths()] + [f"-I{source_dir()}"]
    home = _cuda_home()
    cuda_include = [f"-I{home / 'include'}"] if home else []  # the JIT adds CUDA's include directory too
    warn_nvcc = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"] if werror else []
    warn_cxx = ["-Wall", "-Werror"] if werror else []
    cxx = os.environ.get("CXX", "c++")
    out = Path(tempfile.mkdtemp(prefix="swiftvlm-check-"))
    commands = []
    for f in sources():
        if f.suffix == ".cu":
            commands.append((f, [nvcc, "-c", *nvcc_flags(), *includes, *warn_nvcc, str(f), "-o", str(out / (f.name + ".o"))]))
        else:
            commands.append((f, [cxx, "-c", "-fPIC", *cxx_flags(), *includes, *cuda_include, *warn_cxx, str(f),
                                 "-o", str(out / (f.name + ".o"))]))
    if print_only:
        for _, cmd in commands:
            print(" ".join(cmd))
        return 0

    def run(item):
        f, cmd = item
        r = subprocess.run(cmd, capture_output=True, text=True)
        return f, r.returncode, r.stdout + r.stderr

    failures = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f, rc, log in pool.map(run, commands):
            print(f"{'OK  ' if rc == 0 else 'FAIL'} {f.name:<28} {'sm_' + ', sm_'.join(archs()) if f.suffix == '.cu' else 'host'}",
                  flush=True)
            if rc:
                failures += 1
                print(log, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m swiftvlm_kernels._build --check | --print | --info`."""
    parser = argparse.ArgumentParser(prog="python -m swiftvlm_kernels._build", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compile every source with the JIT's flags (no link)")
    parser.add_argument("--print", action="store_true", help="print the compile commands --check would run")
    parser.add_argument("--info", action="store_true", help="print the arch list, the ABI target and the sources")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    args = parser.parse_args(argv)
    if args.info or not (args.check or args.print):
        print(f"archs: {';'.join(archs())}\ntorch target: {TORCH_TARGET_VERSION}\nsources: {source_dir()}")
        for f in sources():
            print(f"  {f.name}")
        return 0
    if args.print:
        return check(print_only=True)
    if shutil.which(find_nvcc() or "nvcc") is None:
        print("swiftvlm-kernels: nvcc not found (set CUDA_HOME or PATH)", file=sys.stderr)
        return 2
    return 1 if check(jobs=args.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
