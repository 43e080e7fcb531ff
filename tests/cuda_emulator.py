"""The CUDA backend on the CPU: csrc/ compiled as host C++ against tests/cuda_emu (a fiber-per-thread
CUDA emulation, see emu.h), loaded into torch as the same `swiftvlm::<op>_cuda` ops for CPU tensors.

    emu = cuda_emulator.backend()        # builds once per source change (g++, about a minute on 2 cores)
    emu.score_select(q, k, ...)          # the cuda backend's functions, on CPU tensors
    with cuda_emulator.schedule("reverse"): ...   # thread order of the launches inside
    with cuda_emulator.block_order("random", seed=3): ...   # the order their blocks run in

SWIFTVLM_EMU_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer instead (the
process must preload libasan: `python tests/cuda_emulator.py --sanitize` runs the emulated backend
tests that way, CI included).
The real build for a GPU (setup.py, CMakeLists.txt) does not use any of this.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import subprocess
import sys
import types

from swiftvlm_kernels._build import TORCH_TARGET_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.environ.get("SWIFTVLM_EMU_BUILD", os.path.join(ROOT, "build", "cuda_emu"))
SCHEDULES = {"forward": 0, "reverse": 1, "random": 2, "warps": 3}
# Block orders: "schedule" follows the thread schedule (reverse for reverse and warps), "random" draws
# a new seeded permutation of the grid for every launch.
BLOCK_ORDERS = {"schedule": 0, "forward": 1, "reverse": 2, "random": 3}


def _sources(csrc=CSRC):
    return sorted(glob.glob(os.path.join(csrc, "*.cu")) + glob.glob(os.path.join(csrc, "*.cpp"))) + [
        os.path.join(EMU, "emu.cpp")]


def _flags(sanitize: bool):
    import torch.utils.cpp_extension as ext

    flags = ["-std=c++17", "-fPIC", "-DSWIFTVLM_EMULATION", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
             f"-I{EMU}", f"-I{CSRC}", *(f"-I{p}" for p in ext.include_paths()), "-Wall", "-Wno-unused-function"]
    if sanitize:
        flags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer"]
    else:
        flags += ["-O1", "-g0"]
    return flags


# The traffic build: the kernels' sources instrumented with ThreadSanitizer's compiler pass, whose
# access hooks tests/cuda_emu/traffic.cpp defines to count global-memory traffic (no TSan runtime).
TRAFFIC_FLAGS = ["-fsanitize=thread", "-fno-omit-frame-pointer"]


def build(csrc: str = CSRC, sanitize: bool | None = None, tag: str = "", traffic: bool = False) -> str:
    """Compile csrc/*.cu (the kernels and their launchers) and the bindings with the emulation into a shared library (cached by the
    sources' and flags' hash); returns its path. traffic: the build that counts each launch's global
    memory traffic (`count_traffic`)."""
    import torch

    sanitize = os.environ.get("SWIFTVLM_EMU_SANITIZE") == "1" if sanitize is None else sanitize
    if traffic and sanitize:
        raise ValueError("traffic: the traffic build is not a sanitizer build")
    sources = _sources(csrc) + ([os.path.join(EMU, "traffic.cpp")] if traffic else [])
    flags = _flags(sanitize)
    if traffic:
        tag += "traffic-"
    digest = hashlib.sha256()
    headers = sorted(glob.glob(os.path.join(csrc, "*.cuh")) + glob.glob(os.path.join(csrc, "*.h")))
    for path in sources + headers + sorted(glob.glob(os.path.join(EMU, "*.h"))):
        with open(path, "rb") as f:
            digest.update(path.encode() + f.read())
    digest.update(" ".join(flags + (TRAFFIC_FLAGS if traffic else [])).encode() + torch.__version__.encode())
    out_dir = os.path.join(BUILD, f"{tag}{digest.hexdigest()[:16]}{'-san' if sanitize else ''}")
    lib = os.path.join(out_dir, "swiftvlm_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    objects, procs = [], []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        objects.append(obj)
        extra = TRAFFIC_FLAGS if traffic and src.endswith(".cu") else []
        procs.append((src, subprocess.Popen(["g++", "-x", "c++", "-c", src, "-o", obj, *flags, *extra],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        if len([p for _, p in procs if p.poll() is None]) >= (os.cpu_count() or 2):
            procs[0][1].wait()
    errors = []
    for src, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{os.path.relpath(src, ROOT)}:\n{out.decode()[-4000:]}")
    if errors:
        raise RuntimeError("cuda emulation: compile failed\n" + "\n".join(errors))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    link = ["g++", "-shared", "-o", lib + ".tmp", *objects, f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10",
            f"-Wl,-rpath,{torch_lib}"]
    if sanitize:
        link += ["-fsanitize=address,undefined"]
    run = subprocess.run(link, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"cuda emulation: link failed\n{run.stdout}{run.stderr}")
    os.replace(lib + ".tmp", lib)
    return lib


def build_selftest() -> str:
    """The emulator's own test kernels (tests/cuda_emu/selftest.cu) as a plain shared library."""
    out_dir = os.path.join(BUILD, "selftest")
    lib = os.path.join(out_dir, "selftest.so")
    sources = [os.path.join(EMU, "selftest.cu"), os.path.join(EMU, "emu.cpp")]
    stamp = hashlib.sha256(b"".join(open(p, "rb").read() for p in sources + [os.path.join(EMU, "emu.h")])).hexdigest()
    if os.path.exists(lib) and open(lib + ".hash").read() == stamp:
        return lib
    os.makedirs(out_dir, exist_ok=True)
    run = subprocess.run(["g++", "-x", "c++", "-std=c++17", "-O1", "-fPIC", "-shared", f"-I{EMU}", f"-I{CSRC}",
                          "-DSWIFTVLM_EMULATION", "-include", os.path.join(EMU, "emu.h"), *sources, "-o", lib],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"cuda emulation self-test: compile failed\n{run.stdout}{run.stderr}")
    with open(lib + ".hash", "w") as f:
        f.write(stamp)
    return lib


_loaded: dict = {}


def load(lib: str):
    """Load a built library into torch (registers the ops; once per path)."""
    import torch

    if lib not in _loaded:
        torch.ops.load_library(lib)
        _loaded[lib] = ctypes.CDLL(lib)
    return _loaded[lib]


def count_traffic(lib: str, fn) -> list[dict]:
    """Run fn() on the traffic build `lib` (already loaded, `backend(lib)`); per launch: the kernel,
    blocks, threads per block, bytes read and written by global accesses, the distinct 32-byte sectors
    they touch (in bytes) and the most global loads one thread issued."""
    handle = load(lib)
    handle.swiftvlm_traffic_stop.restype = ctypes.c_size_t
    buf = ctypes.create_string_buffer(1 << 20)
    handle.swiftvlm_traffic_start()
    try:
        fn()
    finally:
        needed = handle.swiftvlm_traffic_stop(buf, ctypes.c_size_t(len(buf)))
    if needed > len(buf):
        raise RuntimeError(f"count_traffic: {needed} bytes of launch records, more than the {len(buf)} read")
    rows = []
    for line in buf.value.decode().splitlines():
        name, blocks, threads, read, write, sectors, loads = line.rsplit(" ", 6)
        rows.append(dict(kernel=name, blocks=int(blocks), threads=int(threads), read_bytes=int(read),
                         write_bytes=int(write), sector_bytes=int(sectors), loads_max=int(loads)))
    return rows


@contextlib.contextmanager
def schedule(name: str, seed: int = 1):
    """Launches inside run their threads in this order: forward, reverse, random or warps."""
    handles = list(_loaded.values())
    for h in handles:
        h.swiftvlm_emu_set_schedule(SCHEDULES[name], seed)
    try:
        yield
    finally:
        for h in handles:
            h.swiftvlm_emu_set_schedule(0, 1)


@contextlib.contextmanager
def block_order(name: str, seed: int = 1):
    """Launches inside run their blocks in this order: schedule (the default), forward, reverse or
    random (a new permutation per launch, from `seed`)."""
    handles = list(_loaded.values())
    for h in handles:
        h.swiftvlm_emu_set_block_order(BLOCK_ORDERS[name], seed)
    try:
        yield
    finally:
        for h in handles:
            h.swiftvlm_emu_set_block_order(0, 1)


def assert_schedule_independent(run, name: str, seed: int = 5, block_seed: int = 6):
    """run() with the forward schedule, then with schedule `name` and a random block order: every
    output bit-identical (a missing barrier or a race would show). Returns the first run's outputs."""
    import torch

    with schedule("forward"):
        want = run()
    with schedule(name, seed=seed), block_order("random", seed=block_seed):
        got = run()
    for a, b in zip(got, want):
        assert torch.equal(a, b), name
    return want


def backend(lib: str | None = None):
    """The cuda backend's functions (swiftvlm_kernels/cuda_backend.py) bound to the emulated ops."""
    import torch

    from swiftvlm_kernels import cuda_backend

    load(lib or build())
    module = types.ModuleType("swiftvlm_cuda_emulated")
    env = dict(vars(cuda_backend), _ops=lambda: torch.ops.swiftvlm)
    for name, fn in list(env.items()):  # every function of the module, its helpers included, sees env
        if isinstance(fn, types.FunctionType) and fn.__module__ == cuda_backend.__name__ and name not in (
                "_ops", "_load", "available"):
            env[name] = types.FunctionType(fn.__code__, env, name, fn.__defaults__)
    for name in cuda_backend.__all__:  # an op whose host function is not written yet is left out
        if isinstance(env.get(name), types.FunctionType) and name != "available":
            setattr(module, name, env[name])
    return module


if __name__ == "__main__":
    if "--sanitize" in sys.argv:  # the backend tests on the sanitizer build, libasan preloaded
        asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
        env = dict(os.environ, SWIFTVLM_EMU_SANITIZE="1", LD_PRELOAD=asan,
                   ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        tests = [os.path.join(ROOT, "tests", f)
                 for f in ("test_cuda_emulated.py", "test_backends.py", "test_cuda_score_kernels.py", "test_ragged.py",
                           "test_attention_importance.py")]
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider",
                                  "-k", "(cuda-emu or cuda_emulated or cuda_score_kernels) and not removing"
                                  " and not without_the",
                                  *[a for a in sys.argv[1:] if a != "--sanitize"]], env=env))
    print(build())
